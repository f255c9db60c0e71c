"""TwigVLM's forward and generate: equal to transformers' LLaVA without pruning, equal to an independent reference with it."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from tiny_models import (
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    PAD_TOKEN_ID,
    llava_with_same_base,
    pixel_values,
    prompt_ids,
    tiny_config,
    tiny_twigvlm,
)
from twigvlm import output_cache


ATTENTION = ["eager", "sdpa"]


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_pruning_off_equals_llava(attn_implementation):
    model = tiny_twigvlm(attn_implementation=attn_implementation)
    llava = llava_with_same_base(model, attn_implementation)
    ids, images = prompt_ids(), pixel_values()
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=images, token_reduction="none").logits
        theirs = llava(input_ids=ids, pixel_values=images).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5

    ours = model.generate(input_ids=ids, pixel_values=images, token_reduction="none", max_new_tokens=8, do_sample=False)
    theirs = llava.generate(input_ids=ids, pixel_values=images, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_text_only_prompt_runs_unpruned():
    model = tiny_twigvlm()
    llava = llava_with_same_base(model)
    ids = prompt_ids(image=False)
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, llava.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
    assert all(count == 0 for _, _, count in output_cache(out).visual_token_counts)


def eager_twig_layers(model) -> list[LlamaDecoderLayer]:
    """Copies of the twig's layers running eager attention, so that they return their attention weights."""
    text_config = model.config.text_config.__class__(**model.config.text_config.to_dict())
    text_config._attn_implementation = "eager"
    layers = []
    for i, layer in enumerate(model.model.twig.layers):
        copy = LlamaDecoderLayer(text_config, layer_idx=i).eval()
        copy.load_state_dict(layer.state_dict())
        layers.append(copy)
    return layers


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def reference_top_visual(model, llava, ids, images, num_kept: int) -> torch.Tensor:
    """The spec's score from eager attention weights: last twig layer, last prompt token's row, mean over heads."""
    config = model.config
    language_model = llava.model.language_model
    hidden = embed(llava, ids, images)
    positions = torch.arange(ids.shape[1])[None]
    position_embeddings = language_model.rotary_emb(hidden, positions)
    causal = additive_mask(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril())
    for layer in language_model.layers[: config.twig_attach_layer]:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=position_embeddings)
    twig_layers = eager_twig_layers(model)
    for layer in twig_layers[:-1]:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=position_embeddings)
    last = twig_layers[-1]
    _, weights = last.self_attn(
        last.input_layernorm(hidden), position_embeddings=position_embeddings, attention_mask=causal
    )
    scores = weights.mean(dim=1)[0, -1].masked_fill(ids[0] != IMAGE_TOKEN_ID, float("-inf"))
    return scores.topk(num_kept).indices.sort().values


def embed(llava, ids, images):
    features = llava.model.get_image_features(
        pixel_values=images,
        vision_feature_layer=llava.config.vision_feature_layer,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        return_dict=True,
    ).pooler_output
    hidden = llava.get_input_embeddings()(ids).clone()
    hidden[ids == IMAGE_TOKEN_ID] = torch.cat(list(features))
    return hidden


@torch.no_grad()
def reference_pruned_greedy(model, llava, ids, images, num_kept: int, max_new_tokens: int):
    """
    Greedy decoding with no cache, the pruning written as attention masks over the whole sequence: a visual token is
    visible to layers below K, to layers K..F-1 if it is among the top R, and to no layer from F on.
    """
    config = model.config
    language_model = llava.model.language_model
    is_image = ids[0] == IMAGE_TOKEN_ID
    top = reference_top_visual(model, llava, ids, images, num_kept)
    in_top = torch.zeros_like(is_image)
    in_top[top] = True
    tokens, step_logits = ids, []
    for _ in range(max_new_tokens):
        length = tokens.shape[1]
        hidden = embed(llava, tokens, images)
        position_embeddings = language_model.rotary_emb(hidden, torch.arange(length)[None])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        visual = torch.cat([is_image, torch.zeros(length - ids.shape[1], dtype=torch.bool)])
        top_visual = torch.cat([in_top, torch.zeros(length - ids.shape[1], dtype=torch.bool)])
        for layer_idx, layer in enumerate(language_model.layers):
            if layer_idx < config.twig_attach_layer:
                visible = torch.ones(length, dtype=torch.bool)
            elif layer_idx < config.drop_layer:
                visible = ~visual | top_visual
            else:
                visible = ~visual
            allowed = (causal & visible[None, :]) | torch.eye(length, dtype=torch.bool)
            hidden = layer(hidden, attention_mask=additive_mask(allowed), position_embeddings=position_embeddings)
        logits = llava.lm_head(language_model.norm(hidden))[:, -1]
        step_logits.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens, top, torch.cat(step_logits)


PRUNING_CASES = [  # K, T, F, R
    (2, 2, 6, 4),
    (2, 2, None, 4),  # no FinalWipe
    (2, 2, 6, NUM_IMAGE_TOKENS),  # keep everything up to F
    (1, 3, 4, 7),
    (3, 1, 5, 0),  # every visual token dropped at K
]


@pytest.mark.parametrize("attn_implementation", ATTENTION)
@pytest.mark.parametrize("twig_attach_layer, num_twig_layers, final_wipe_layer, num_kept", PRUNING_CASES)
def test_pruned_generation_equals_mask_reference(
    attn_implementation, twig_attach_layer, num_twig_layers, final_wipe_layer, num_kept
):
    config = tiny_config(
        twig_attach_layer=twig_attach_layer, num_twig_layers=num_twig_layers, final_wipe_layer=final_wipe_layer
    )
    model = tiny_twigvlm(config, attn_implementation)
    llava = llava_with_same_base(model, "eager")
    ids, images = prompt_ids(), pixel_values()

    out = model.generate(
        input_ids=ids,
        pixel_values=images,
        num_kept_visual_tokens=num_kept,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    expected_tokens, expected_top, expected_logits = reference_pruned_greedy(model, llava, ids, images, num_kept, 6)
    assert torch.equal(out.sequences, expected_tokens)
    assert (torch.cat(out.logits) - expected_logits).abs().max() < 1e-4

    cache = output_cache(out)
    kept_at_k = cache.kept_prompt_positions.get(twig_attach_layer, torch.arange(ids.shape[1])[None])
    kept_visual = kept_at_k[0][ids[0, kept_at_k[0]] == IMAGE_TOKEN_ID]
    assert torch.equal(kept_visual, expected_top)
    drop_layer = config.drop_layer
    expected_counts = [(0, twig_attach_layer, NUM_IMAGE_TOKENS), (twig_attach_layer, drop_layer, num_kept)]
    if drop_layer < config.num_base_layers:
        expected_counts.append((drop_layer, config.num_base_layers, 0))
    assert cache.visual_token_counts == expected_counts


@pytest.mark.parametrize("speculative", [False, True])
def test_cache_lengths_after_generation(speculative):
    model = tiny_twigvlm()
    ids, images = prompt_ids(), pixel_values()
    new_tokens = 7
    out = model.generate(
        input_ids=ids, pixel_values=images, num_kept_visual_tokens=3, max_new_tokens=new_tokens, do_sample=False,
        return_dict_in_generate=True, speculative_decoding=speculative,
    )
    cache, length = output_cache(out), ids.shape[1] + new_tokens - 1  # the last token is never fed back
    expected = [length] * 2 + [length - NUM_IMAGE_TOKENS + 3] * 4 + [length - NUM_IMAGE_TOKENS] * 2
    assert [cache.get_seq_length(i) for i in range(8)] == expected
    # Plain decoding frees the twig after scoring; drafting keeps it in step with the base layers.
    twig_lengths = [cache.get_seq_length(i) for i in cache.twig_layer_indices]
    assert twig_lengths == ([length] * 2 if speculative else [0, 0])
    assert cache.draft_attach_hidden_states is None


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_batch_equals_single_runs(attn_implementation):
    model = tiny_twigvlm(attn_implementation=attn_implementation)
    prompts = [prompt_ids(2, 3, seed=1), prompt_ids(5, 6, seed=2), prompt_ids(1, 2, seed=3)]
    images = pixel_values(3, seed=4)
    width = max(p.shape[1] for p in prompts)
    batch = torch.full((3, width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - prompt.shape[1] :] = prompt[0]
        attention_mask[row, width - prompt.shape[1] :] = 1
    kwargs = dict(num_kept_visual_tokens=5, max_new_tokens=6, do_sample=False, pad_token_id=PAD_TOKEN_ID)

    batched = model.generate(input_ids=batch, attention_mask=attention_mask, pixel_values=images, **kwargs)
    for row, prompt in enumerate(prompts):
        single = model.generate(input_ids=prompt, pixel_values=images[row : row + 1], **kwargs)
        assert torch.equal(batched[row, width:], single[0, prompt.shape[1] :])


def test_budget_formula_matches_paper():
    config = tiny_config(num_layers=32, twig_attach_layer=2, num_twig_layers=3, final_wipe_layer=24)
    assert [config.num_kept_for_budget(budget, 576) for budget in (64, 128, 192)] == [41, 134, 227]


def test_budget_per_call_and_in_config():
    model = tiny_twigvlm(tiny_config(visual_token_budget=3))
    ids, images = prompt_ids(), pixel_values()

    def counts(**kwargs):
        out = model(input_ids=ids, pixel_values=images, use_cache=True, **kwargs)
        return [count for _, _, count in output_cache(out).visual_token_counts]

    # L=8, K=2, F=6, M=16: R = ceil((8·3 − 2·16) / 4) < 0 → below the reachable minimum of K·M/L = 4.
    with pytest.raises(ValueError, match="below 4"):
        counts()
    assert counts(visual_token_budget=6) == [16, 4, 0]  # ceil((48 − 32) / 4)
    assert counts(num_kept_visual_tokens=9) == [16, 9, 0]
    assert counts(visual_token_budget=100) == [16, 16, 0]  # a budget above M keeps every visual token
    assert counts(num_kept_visual_tokens=0) == [16, 0, 0]
    assert counts(token_reduction="none") == [16, 16, 16]
    with pytest.raises(ValueError, match="not both"):
        counts(visual_token_budget=6, num_kept_visual_tokens=3)
    with pytest.raises(ValueError, match=">= 0"):
        counts(num_kept_visual_tokens=-1)
    with pytest.raises(ValueError, match="unknown"):
        counts(token_reduction="fastest")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(twig_attach_layer=6, num_twig_layers=3), "num_twig_layers=3 must lie in 1..2"),
        (dict(twig_attach_layer=0), "twig_attach_layer=0 must lie in 1..7"),
        (dict(final_wipe_layer=2), "final_wipe_layer=2 must lie in 3..8"),
        (dict(visual_token_budget=-5), "visual_token_budget=-5 must be >= 0"),
    ],
)
def test_config_rejects_impossible_twig(fields, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**fields)


def test_image_token_count_must_match_images():
    model = tiny_twigvlm()
    ids = prompt_ids()
    ids = torch.cat([ids[:, :5], ids[:, 6:]], dim=1)  # one image token short
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids, pixel_values=pixel_values())


def test_unservable_generation_modes_are_refused():
    model = tiny_twigvlm()
    ids, images = prompt_ids(), pixel_values()
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(input_ids=ids, pixel_values=images, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(input_ids=ids, pixel_values=images, max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="loss"):
        model(input_ids=ids, pixel_values=images, labels=ids)
    # Without pruning the same requests are plain LLaVA and work.
    model.generate(input_ids=ids, pixel_values=images, max_new_tokens=2, use_cache=False, token_reduction="none")
    assert model(input_ids=ids, pixel_values=images, labels=ids, token_reduction="none").loss is not None


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_twig_forward_is_the_shallow_model(attn_implementation):
    """Twig logits = twig head(twig norm(twig layers(base layers 0..K-1(embeddings)))), with or without a cache."""
    model = tiny_twigvlm(attn_implementation=attn_implementation)
    llava = llava_with_same_base(model, "eager")
    ids, images = prompt_ids(), pixel_values()
    with torch.no_grad():
        hidden = embed(llava, ids, images)
        positions = torch.arange(ids.shape[1])[None]
        position_embeddings = llava.model.language_model.rotary_emb(hidden, positions)
        causal = additive_mask(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril())
        for layer in [*llava.model.language_model.layers[:2], *eager_twig_layers(model)]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=position_embeddings)
        expected = model.model.twig.lm_head(model.model.twig.norm(hidden))

        whole = model.twig_forward(input_ids=ids, pixel_values=images).logits
        assert (whole - expected).abs().max() < 1e-5

        # In two chunks through a cache, as drafting does: the same logits.
        from twigvlm import TwigVLMCache

        cache = TwigVLMCache(model.config)
        split = ids.shape[1] - 3
        first = model.twig_forward(input_ids=ids[:, :split], pixel_values=images, cache=cache).logits
        second = model.twig_forward(input_ids=ids[:, split:], cache=cache).logits
        assert (torch.cat([first, second], dim=1) - expected).abs().max() < 1e-5
        assert [cache.get_seq_length(i) for i in (0, 1, 2, 8, 9)] == [ids.shape[1]] * 2 + [0] + [ids.shape[1]] * 2
