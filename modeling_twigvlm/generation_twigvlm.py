"""Self-speculative decoding (SSD): the twig drafts from the verifier's own cache, the full model verifies."""

from dataclasses import dataclass

import torch
from transformers.generation.candidate_generator import CandidateGenerator


def speculative_generation_defaults(config) -> dict:
    """The generation-config fields that turn SSD on, with the paper's draft length and confidence threshold."""
    return {
        "assistant_early_exit": config.twig_attach_layer,
        "num_assistant_tokens": 5,
        "assistant_confidence_threshold": 0.6,
        "num_assistant_tokens_schedule": "constant",
    }


@dataclass
class SpeculationStats:
    """What one `generate` call's drafting achieved; found on the returned cache as `speculation_stats`."""

    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Draft tokens accepted per verification round."""
        return self.accepted_tokens / self.rounds if self.rounds else 0.0


class TwigDraftCandidateGenerator(CandidateGenerator):
    """
    Drafts with the shallow model (base layers 0..K-1, the twig, its head) inside transformers' assisted decoding.

    Nothing is prefilled twice and nothing is copied: the draft reads and extends the verifier's KV of layers 0..K-1
    (every visual token included) and the twig's own KV, both in the one `TwigVLMCache`. The layer-K hidden states of
    drafted tokens wait in the cache, so the verifier runs layers 0..K-1 only on the last draft token; it also runs the
    twig on it, so that after transformers crops the rejected drafts from every layer, all layers, the twig's too,
    hold the same accepted tokens. The first call returns no draft, so the verifier's prefill sees the prompt alone
    (the twig-guided pruning scores the last prompt token).
    """

    requires_model_outputs = True
    model_kwargs_overrides = {}

    def __init__(self, model, generation_config, logits_processor, cache):
        if generation_config.assistant_early_exit != model.config.twig_attach_layer:
            raise ValueError(
                f"TwigVLM drafts with its twig on layer {model.config.twig_attach_layer}: pass "
                f"assistant_early_exit={model.config.twig_attach_layer} (or speculative_decoding=True) for "
                "self-speculative decoding, or speculative_decoding=False to decode without it."
            )
        self.model = model
        self.logits_processor = logits_processor
        self.do_sample = generation_config.do_sample
        self.max_length = generation_config.max_length
        self.num_assistant_tokens = generation_config.num_assistant_tokens or 5
        self.schedule = generation_config.num_assistant_tokens_schedule or "constant"
        if self.schedule not in ("constant", "heuristic"):
            raise ValueError(
                f"num_assistant_tokens_schedule={self.schedule!r} is not supported by TwigVLM's drafting; "
                "use 'constant' or 'heuristic'."
            )
        threshold = generation_config.assistant_confidence_threshold
        self.confidence_threshold = 0.6 if threshold is None else threshold
        self.eos_token_id = getattr(generation_config, "_eos_token_tensor", None)
        self.cache = cache
        cache.keep_twig_cache = True
        cache.speculation_stats = SpeculationStats()
        self.num_drafted = 0

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict,
        model_outputs=None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        self.num_drafted = 0
        max_new = min(self.num_assistant_tokens, self.max_length - input_ids.shape[1] - 1)
        if is_first_iteration or max_new <= 0:
            return input_ids, None

        # Every layer holds all tokens but the last one, which the verifier has just chosen.
        candidate_ids, draft_logits, next_input = input_ids, [], input_ids[:, -1:]
        for _ in range(max_new):
            twig_outputs = self.model.model.twig_forward(input_ids=next_input, cache=self.cache)
            self.cache.add_draft_attach_hidden_states(twig_outputs.attach_layer_hidden_states)
            logits = self.model.model.twig.lm_head(twig_outputs.last_hidden_state[:, -1]).float()
            logits = self.logits_processor(candidate_ids, logits)
            probabilities = logits.softmax(dim=-1)
            if self.do_sample:
                token = torch.multinomial(probabilities, num_samples=1)
            else:
                token = logits.argmax(dim=-1, keepdim=True)
            candidate_ids = torch.cat([candidate_ids, token], dim=-1)
            draft_logits.append(logits)
            is_eos = self.eos_token_id is not None and torch.isin(token, self.eos_token_id.to(token.device)).any()
            if is_eos or probabilities.gather(-1, token).item() < self.confidence_threshold:
                break
            next_input = token
        # The last draft was never fed to the draft model: the verifier runs layers 0..K-1 on it alone.
        self.num_drafted = len(draft_logits)
        return candidate_ids, torch.stack(draft_logits, dim=1)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        if self.num_drafted == 0:
            return
        num_matches = int(num_matches)
        stats = self.cache.speculation_stats
        stats.rounds += 1
        stats.drafted_tokens += self.num_drafted
        stats.accepted_tokens += num_matches
        if self.schedule == "heuristic":
            if num_matches == self.num_drafted:
                self.num_assistant_tokens += 2
            else:
                self.num_assistant_tokens = max(1, self.num_assistant_tokens - 1)


__all__ = ["SpeculationStats", "TwigDraftCandidateGenerator", "speculative_generation_defaults"]
