"""The KV cache of TwigVLM: the base model's layers, grouped by how many prompt tokens they kept, and the twig's."""

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class TwigVLMCache(DynamicCache):
    """
    A [`DynamicCache`] with the L base layers followed by the T twig layers (cache slots L..L+T-1).

    Token pruning in the prefill splits the base layers into groups `[0, K)`, `[K, F)`, `[F, L)` that hold different
    numbers of prompt tokens; every later token is appended to all of them, so the per-layer lengths that
    `DynamicCache` already tracks stay consistent and `crop(-n)` rolls every layer back alike. Layers 0..K-1 are never
    pruned, so `get_seq_length()` (layer 0) is the true sequence length `generate` expects.

    `kept_prompt_positions[start]` holds, for the group starting at base layer `start`, the prompt positions it kept
    (`[batch, n]`, ascending), from which a padding mask over the whole sequence is cut down to that group.
    """

    def __init__(self, config):
        text_config = config.get_text_config(decoder=True)
        super().__init__(config=text_config)
        self.layers.extend(DynamicLayer() for _ in range(config.num_twig_layers))
        self.num_base_layers = text_config.num_hidden_layers
        self.group_starts = sorted({0, config.twig_attach_layer, config.drop_layer} - {self.num_base_layers})
        # Whether the twig's KV is kept after the prefill (self-speculative drafting reads it); plain decoding frees it.
        self.keep_twig_cache = False
        self.prompt_length: int | None = None
        self.kept_prompt_positions: dict[int, torch.Tensor] = {}
        self.visual_token_counts: list[tuple[int, int, int]] = []
        # Hidden states entering layer K of tokens the draft ran through layers 0..K-1, awaiting the verifier.
        self.draft_attach_hidden_states: torch.Tensor | None = None
        self.speculation_stats = None

    @property
    def layer_groups(self) -> list[tuple[int, int]]:
        """The base layers as `(first, end)` ranges that share one token set."""
        ends = self.group_starts[1:] + [self.num_base_layers]
        return list(zip(self.group_starts, ends))

    @property
    def twig_layer_indices(self) -> range:
        return range(self.num_base_layers, len(self.layers))

    def group_attention_mask(self, attention_mask: torch.Tensor | None, group_start: int) -> torch.Tensor | None:
        """Cut a 2D padding mask over the whole sequence (prompt + generated) down to the tokens a group holds."""
        kept = self.kept_prompt_positions.get(group_start)
        if attention_mask is None or kept is None:
            return attention_mask
        prompt_mask = attention_mask[:, : self.prompt_length].gather(1, kept.to(attention_mask.device))
        return torch.cat([prompt_mask, attention_mask[:, self.prompt_length :]], dim=1)

    def add_draft_attach_hidden_states(self, hidden_states: torch.Tensor) -> None:
        pending = self.draft_attach_hidden_states
        self.draft_attach_hidden_states = hidden_states if pending is None else torch.cat([pending, hidden_states], 1)

    def pop_draft_attach_hidden_states(self) -> torch.Tensor | None:
        pending, self.draft_attach_hidden_states = self.draft_attach_hidden_states, None
        return pending

    def free_twig(self) -> None:
        # Fresh layers rather than `reset()`, which zeroes the tensors in place on older transformers.
        for layer_idx in self.twig_layer_indices:
            self.layers[layer_idx] = DynamicLayer()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.kept_prompt_positions = {
            start: kept.repeat_interleave(repeats, dim=0) for start, kept in self.kept_prompt_positions.items()
        }

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.kept_prompt_positions = {start: kept[indices] for start, kept in self.kept_prompt_positions.items()}


__all__ = ["TwigVLMCache"]
