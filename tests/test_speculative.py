"""Self-speculative decoding: the twig drafts from the shared cache, the full model verifies, greedy output is unchanged."""

import pytest
import torch
import transformers.generation.utils as generation_utils
from transformers.generation.streamers import BaseStreamer

from tiny_models import pixel_values, prompt_ids, tiny_config, tiny_twigvlm, twig_copy_of_deep_layers
from twigvlm import output_cache


REGIMES = {
    "random twig": lambda attn: tiny_twigvlm(tiny_config(num_layers=4, final_wipe_layer=None), attn),
    "twig = deep layers": lambda attn: twig_copy_of_deep_layers(attn),
    "perturbed copy": lambda attn: twig_copy_of_deep_layers(attn, noise=0.06),
}


def generate_both(model, max_new_tokens: int, **kwargs):
    inputs = dict(input_ids=prompt_ids(), pixel_values=pixel_values(), max_new_tokens=max_new_tokens, do_sample=False)
    inputs.update(kwargs)
    plain = model.generate(**inputs, speculative_decoding=False)
    speculative = model.generate(
        **inputs, speculative_decoding=True, assistant_confidence_threshold=0.0, return_dict_in_generate=True
    )
    return plain, speculative


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("token_reduction", ["twig", "none"])
def test_greedy_speculative_equals_greedy(regime, attn_implementation, token_reduction):
    model = REGIMES[regime](attn_implementation)
    for max_new_tokens in (3, 9, 12):  # 9 and 12 end inside a draft of 5 when every draft is accepted
        plain, speculative = generate_both(model, max_new_tokens, token_reduction=token_reduction, num_kept_visual_tokens=5)
        assert torch.equal(plain, speculative.sequences), (max_new_tokens, plain, speculative.sequences)
        assert speculative.sequences.shape[1] == prompt_ids().shape[1] + max_new_tokens


def test_acceptance_in_the_three_regimes():
    rates = {}
    for regime, build in REGIMES.items():
        _, speculative = generate_both(build("sdpa"), 24, token_reduction="none")
        stats = output_cache(speculative).speculation_stats
        assert stats.rounds > 0 and stats.drafted_tokens >= stats.accepted_tokens
        rates[regime] = stats.acceptance_rate
    assert rates["random twig"] < 0.15
    assert rates["twig = deep layers"] == 1.0
    assert 0.15 < rates["perturbed copy"] < 0.95, rates


def test_eos_inside_a_draft():
    model = twig_copy_of_deep_layers()
    plain, _ = generate_both(model, 12, token_reduction="none")
    prompt_length = prompt_ids().shape[1]
    eos = int(plain[0, prompt_length + 3])  # accepted mid-draft: every draft of this twig is accepted
    plain, speculative = generate_both(model, 12, token_reduction="none", eos_token_id=eos, pad_token_id=0)
    assert torch.equal(plain, speculative.sequences)
    assert int(speculative.sequences[0, -1]) == eos and (speculative.sequences[0, prompt_length:] == eos).sum() == 1


def test_each_token_runs_layers_below_k_once_and_the_twig_never_prefills_again():
    model = twig_copy_of_deep_layers(noise=0.06)
    tokens_through = {"base layer 0": 0, "base layer 1": 0, "twig layer 0": 0}
    modules = {
        "base layer 0": model.model.language_model.layers[0],
        "base layer 1": model.model.language_model.layers[1],
        "twig layer 0": model.model.twig.layers[0],
    }
    for name, module in modules.items():
        module.register_forward_hook(lambda _m, args, _o, name=name: tokens_through.__setitem__(name, tokens_through[name] + args[0].shape[1]))
    _, speculative = generate_both(model, 20, token_reduction="twig", num_kept_visual_tokens=4)
    tokens_through = {name: 0 for name in tokens_through}  # count the speculative call alone
    speculative = model.generate(
        input_ids=prompt_ids(), pixel_values=pixel_values(), max_new_tokens=20, do_sample=False,
        speculative_decoding=True, assistant_confidence_threshold=0.0, return_dict_in_generate=True,
        num_kept_visual_tokens=4,
    )
    cache, stats = output_cache(speculative), output_cache(speculative).speculation_stats
    rejected = stats.drafted_tokens - stats.accepted_tokens
    assert 0 < stats.accepted_tokens < stats.drafted_tokens  # some drafts were rolled back
    # Every token that was ever in the cache went through each of these layers exactly once.
    assert tokens_through["base layer 0"] == cache.get_seq_length(0) + rejected
    assert tokens_through["base layer 1"] == cache.get_seq_length(1) + rejected
    assert tokens_through["twig layer 0"] == cache.get_seq_length(cache.num_base_layers) + rejected
    assert cache.get_seq_length(cache.num_base_layers) == cache.get_seq_length(0)


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")


def test_streamer_receives_the_final_tokens_once_in_order():
    model = twig_copy_of_deep_layers(noise=0.06)
    streamer = RecordingStreamer()
    ids = prompt_ids()
    out = model.generate(
        input_ids=ids, pixel_values=pixel_values(), max_new_tokens=15, do_sample=False, streamer=streamer,
        speculative_decoding=True, assistant_confidence_threshold=0.0,
    )
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    streamed = [token for chunk in streamer.chunks[1:-1] for token in chunk]
    assert streamed == out[0, ids.shape[1] :].tolist()
    assert any(len(chunk) > 1 for chunk in streamer.chunks[1:-1])  # accepted drafts arrive together


def test_batch_falls_back_from_defaults_and_refuses_when_asked(caplog):
    model = tiny_twigvlm()
    batch = torch.cat([prompt_ids(seed=1), prompt_ids(seed=2)])
    inputs = dict(input_ids=batch, pixel_values=pixel_values(2), max_new_tokens=3, do_sample=False)
    model.generate(**inputs)  # SSD on from the model's generation config: decodes without it
    with pytest.raises(ValueError, match="speculative_decoding=False"):
        model.generate(**inputs, speculative_decoding=True)
    with pytest.raises(ValueError, match="assistant_early_exit=2"):
        model.generate(input_ids=prompt_ids(), pixel_values=pixel_values(), max_new_tokens=3, assistant_early_exit=5)


def sampled_second_tokens(model, prompt, num_samples: int, **kwargs) -> torch.Tensor:
    counts = torch.zeros(model.config.text_config.vocab_size)
    for seed in range(num_samples):
        torch.manual_seed(seed)
        out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=True, top_k=0, temperature=1.5, **kwargs)
        counts[out[0, prompt.shape[1] + 1]] += 1
    return counts / num_samples


@torch.no_grad()
def exact_second_token_distribution(model, prompt) -> torch.Tensor:
    first = (model(input_ids=prompt, token_reduction="none").logits[0, -1] / 1.5).softmax(-1)
    continuations = torch.cat([prompt.expand(len(first), -1), torch.arange(len(first))[:, None]], dim=1)
    second = (model(input_ids=continuations, token_reduction="none").logits[:, -1] / 1.5).softmax(-1)
    return first @ second


def test_speculative_sampling_keeps_the_verifier_distribution(monkeypatch):
    """The second token is drafted and verified; its distribution must be the full model's (total variation)."""
    config = tiny_config(num_layers=2, twig_attach_layer=1, num_twig_layers=1, final_wipe_layer=None)
    config.text_config.vocab_size = 8
    model = tiny_twigvlm(config)
    model.generation_config.eos_token_id = None  # every sample has its three tokens
    with torch.no_grad():  # a broad full-model distribution and a twig that disagrees with it
        model.lm_head.weight.mul_(8.0)
        model.model.twig.lm_head.weight.mul_(8.0)
    prompt = torch.tensor([[1, 2, 3]])
    exact = exact_second_token_distribution(model, prompt)
    speculative = dict(speculative_decoding=True, assistant_confidence_threshold=0.0)
    tolerance = 0.06  # total variation; sampling noise with 1500 draws over 8 tokens is about 0.03

    observed = sampled_second_tokens(model, prompt, 1500, **speculative)
    assert 0.5 * (observed - exact).abs().sum() < tolerance

    def accept_every_draft(candidate_input_ids, candidate_logits, candidate_length, new_logits, *args, **kwargs):
        bonus = torch.multinomial(new_logits[0, -1].softmax(-1), 1)[None]
        return torch.cat([candidate_input_ids[:, -candidate_length:], bonus], dim=1), candidate_length

    monkeypatch.setattr(generation_utils, "_speculative_sampling", accept_every_draft)
    broken = sampled_second_tokens(model, prompt, 1500, **speculative)
    assert 0.5 * (broken - exact).abs().sum() > tolerance


@pytest.mark.parametrize("schedule, drafts_per_round", [("constant", 3), ("heuristic", None)])
def test_draft_length_follows_num_assistant_tokens_and_schedule(schedule, drafts_per_round):
    model = twig_copy_of_deep_layers()  # every draft accepted
    out = model.generate(
        input_ids=prompt_ids(), pixel_values=pixel_values(), max_new_tokens=30, do_sample=False,
        speculative_decoding=True, num_assistant_tokens=3, num_assistant_tokens_schedule=schedule,
        assistant_confidence_threshold=0.0, return_dict_in_generate=True, token_reduction="none",
    )
    stats = output_cache(out).speculation_stats
    if drafts_per_round is not None:  # 29 tokens after the prefill's: 7 rounds of 3 drafts + a bonus, then one plain
        assert (stats.rounds, stats.drafted_tokens, stats.accepted_tokens) == (7, 21, 21)
    else:  # full acceptance grows the draft by 2 each round: 3, 5, 7, ...
        assert stats.mean_accepted_length > 4
