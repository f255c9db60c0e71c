"""
The token-reduction methods behind one interface, each checked against a reference written here from the formulas of
`../shared/specs/baselines.md` on eager attention weights (full matrices are fine in a test), plus their budget
settings at LLaVA-1.5 sizes, sdpa = eager, batches = single runs, and the cache after generation.
"""

import math

import pytest
import torch
from torch import nn

from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VISION_CONFIG, llava_with_same_base, text_config, tiny_twigvlm
from twigvlm import TwigVLMConfig, output_cache, output_image_features
from twigvlm.configuration_twigvlm import TOKEN_REDUCTIONS
from twigvlm.token_reduction_twigvlm import (
    TOKEN_REDUCTION_STRATEGIES,
    TokenReductionStrategy,
    build_token_reduction,
)


IMAGE_SIZE, GRID = 84, 6  # 6 x 6 patches of 14 pixels
NUM_PATCHES = GRID * GRID
FEATURE_LAYER = 2  # vision_feature_layer=-2 of a 4-layer encoder: the output of layer 2


def reduction_config(num_layers: int = 8, **fields) -> TwigVLMConfig:
    twig = dict(twig_attach_layer=2, num_twig_layers=2, final_wipe_layer=6)
    twig.update(fields)
    return TwigVLMConfig(
        vision_config={**VISION_CONFIG, "num_hidden_layers": 4, "image_size": IMAGE_SIZE},
        text_config=text_config(num_layers),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=NUM_PATCHES,
        **twig,
    )


_MODELS = {}


def model_and_reference(attn_implementation: str = "eager"):
    """The tiny model (random weights) and transformers' LLaVA with the same base weights, eager, for the references."""
    if attn_implementation not in _MODELS:
        model = tiny_twigvlm(reduction_config(), attn_implementation)
        _MODELS[attn_implementation] = (model, llava_with_same_base(model, "eager"))
    return _MODELS[attn_implementation]


def prompt(num_before: int = 3, num_after: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(1, IMAGE_TOKEN_ID, (num_before,), generator=generator)
    after = torch.randint(1, IMAGE_TOKEN_ID, (num_after,), generator=generator)
    return torch.cat([before, torch.full((NUM_PATCHES,), IMAGE_TOKEN_ID), after])[None]


def images(batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


# Options that make every method act on the tiny model (its encoder has 4 layers, its language model 8).
OPTIONS = {
    "twig": dict(num_kept_visual_tokens=5),
    "none": {},
    "fastv": dict(num_kept_visual_tokens=7, token_reduction_options=dict(layer=3)),
    "sparsevlm": dict(token_reduction_options=dict(layers=(1, 4), scale=3.0, bias=1.0)),
    "visionzip": dict(visual_token_budget=10),
    "fastervlm": dict(visual_token_budget=9),
    "illava": dict(num_kept_visual_tokens=6, token_reduction_options=dict(vit_layers=(1, 2), vit_merges=4, llm_layer=2)),
    "mustdrop": dict(
        token_reduction_options=dict(
            layers=(1, 4), window=2, similarity_threshold=0.0, global_threshold=0.045, individual_threshold=0.06
        )
    ),
    "random": dict(visual_token_budget=8, token_reduction_options=dict(seed=3)),
    "pooling": dict(visual_token_budget=6),
}


def run_method(model, name: str, ids, pixels, **kwargs):
    """One prefill with the method's options; returns the output (logits of the last prompt token) and cache."""
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, token_reduction=name, use_cache=True, **OPTIONS[name], **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# An eager reference of the language model: layer by layer, full attention weights, hooks after chosen layers
# ---------------------------------------------------------------------------------------------------------------------


class Sequence:
    """One prompt inside the reference: hidden states, RoPE positions, prompt positions and image flags per token."""

    def __init__(self, hidden, positions, prompt_positions, is_image):
        self.hidden, self.positions = hidden, list(positions)
        self.prompt_positions, self.is_image = list(prompt_positions), list(is_image)

    def image_indices(self) -> list[int]:
        return [i for i, image in enumerate(self.is_image) if image]

    def after_image(self) -> list[int]:
        last = max(self.image_indices())
        return list(range(last + 1, len(self.is_image)))

    def select(self, order: list, compact: bool = True) -> "Sequence":
        """The tokens at `order` (indices into this sequence, or ("new", hidden, prompt position))."""
        hidden, prompt_positions, is_image, positions = [], [], [], []
        for item in order:
            if isinstance(item, tuple):
                hidden.append(item[1])
                prompt_positions.append(item[2])
                is_image.append(True)
                positions.append(None)
            else:
                hidden.append(self.hidden[0, item])
                prompt_positions.append(self.prompt_positions[item])
                is_image.append(self.is_image[item])
                positions.append(self.positions[item])
        if compact:
            positions = range(len(order))
        return Sequence(torch.stack(hidden)[None], positions, prompt_positions, is_image)


def eager_layer(layer, hidden, positions, rotary_emb):
    """A decoder layer by hand, eager attention under a causal mask: its output and attention weights [H, n, n]."""
    n = hidden.shape[1]
    position_embeddings = rotary_emb(hidden, torch.tensor(positions)[None])
    mask = torch.where(torch.ones(n, n, dtype=torch.bool).tril(), 0.0, torch.finfo(torch.float32).min)[None, None]
    attended, weights = layer.self_attn(
        layer.input_layernorm(hidden), position_embeddings=position_embeddings, attention_mask=mask
    )
    hidden = hidden + attended
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), weights[0]


@torch.no_grad()
def reference_prefill(llava, sequence: Sequence, after_layer: dict):
    """The prefill's last-token logits; `after_layer[l](sequence, weights of layer l)` gives what layer l+1 sees."""
    language_model = llava.model.language_model
    stages = {}
    for layer_idx, layer in enumerate(language_model.layers):
        sequence.hidden, weights = eager_layer(layer, sequence.hidden, sequence.positions, language_model.rotary_emb)
        if layer_idx in after_layer:
            sequence = after_layer[layer_idx](sequence, weights)
            stages[layer_idx + 1] = list(sequence.prompt_positions)
    return llava.lm_head(language_model.norm(sequence.hidden))[0, -1], stages


def text_embeddings(llava, ids):
    return llava.get_input_embeddings()(ids)


@torch.no_grad()
def prompt_with_features(llava, ids, features: torch.Tensor, sources: list[int] | None = None) -> Sequence:
    """
    The prompt with the reduced image tokens in place of the placeholders (compact positions); a token's prompt position
    is the placeholder of the patch `sources` says it stands for (default: the first placeholders).
    """
    image_slots = (ids[0] == IMAGE_TOKEN_ID).nonzero()[:, 0].tolist()
    sources = list(range(len(features))) if sources is None else sources
    before, after = list(range(image_slots[0])), list(range(image_slots[-1] + 1, ids.shape[1]))
    kept = before + [image_slots[source] for source in sources] + after
    hidden = text_embeddings(llava, ids[:, kept]).clone()
    is_image = [False] * len(before) + [True] * len(sources) + [False] * len(after)
    hidden[0, torch.tensor(is_image)] = features
    return Sequence(hidden, range(len(kept)), kept, is_image)


def image_records(cache, ids) -> tuple[list[int], dict[int, int]]:
    """From the cache: the patches layer 0 holds, in order, and which patch each merged patch joined."""
    first = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    kept = [p - first for p in kept_positions(cache, 0) if first <= p < first + NUM_PATCHES]
    merged = cache.merged_into_positions[0][0].tolist()[first : first + NUM_PATCHES]
    return kept, {patch: target - first for patch, target in enumerate(merged) if target >= 0}


@torch.no_grad()
def full_prompt(llava, ids, pixels) -> Sequence:
    features = llava.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default", return_dict=True
    ).pooler_output[0]
    return prompt_with_features(llava, ids, features)


def kept_positions(cache, group_start: int) -> list[int]:
    return [p for p in cache.kept_prompt_positions[group_start][0].tolist() if p >= 0]


def assert_close(actual, expected, tolerance: float = 1e-4):
    assert (actual - expected).abs().max() < tolerance, (actual - expected).abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# The vision encoder by hand, eager, for the vision-side references
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def eager_vision(llava, pixels, inside_layer=None, after_layer=None):
    """
    The CLIP tower layer by hand: `inside_layer[l](hidden after attention, weights)` edits inside layer l (before its
    MLP), `after_layer[l](hidden, weights)` after it. Returns the hidden states entering each layer and their weights.
    """
    tower = llava.model.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixels))
    inputs, attentions = [], []
    for layer_idx, layer in enumerate(tower.encoder.layers):
        inputs.append(hidden)
        attended, weights = layer.self_attn(layer.layer_norm1(hidden), output_attentions=True)
        attentions.append(weights[0])
        hidden = hidden + attended
        if inside_layer and layer_idx in inside_layer:
            hidden = inside_layer[layer_idx](hidden, weights[0])
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        if after_layer and layer_idx in after_layer:
            hidden = after_layer[layer_idx](hidden, weights[0])
    inputs.append(hidden)
    return inputs, attentions


def project(llava, features):
    return llava.model.multi_modal_projector(features)


# ---------------------------------------------------------------------------------------------------------------------
# Per method: the kept or merged tokens equal the reference, and so do the prefill's logits
# ---------------------------------------------------------------------------------------------------------------------


def test_registry_matches_config():
    assert set(TOKEN_REDUCTION_STRATEGIES) == set(TOKEN_REDUCTIONS)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_rows_a_strategy_gets_are_the_layers_weights(attn_implementation, monkeypatch):
    """A strategy's attention rows, computed from q/k whatever the backend, equal the eager layer's full weights."""
    recorded = {}

    class RecordRows(TokenReductionStrategy):
        name = "fastv"  # stands in for a registered method
        acts_at, budget_meaning = "LLM layer 3", "none"

        def configure(self, visual_token_budget, num_kept_visual_tokens):
            self.llm_layers, self.signal_layers = (3,), (2,)

        def on_llm_layer(self, layer_idx, hidden_states, tokens, run):
            recorded["rows"], recorded["valid"] = run.attention_rows(2, tokens, tokens.real_mask)
            recorded["last"] = run.last_token_attention(2, tokens)

    monkeypatch.setitem(TOKEN_REDUCTION_STRATEGIES, "fastv", RecordRows)
    model, llava = model_and_reference(attn_implementation)
    ids, pixels = prompt(), images()
    weights = {}

    def keep_weights(sequence, layer_weights):
        weights["layer 2"] = layer_weights.mean(dim=0)
        return sequence

    with torch.no_grad():
        reference_prefill(llava, full_prompt(llava, ids, pixels), {2: keep_weights})
        model(input_ids=ids, pixel_values=pixels, token_reduction="fastv")
    assert recorded["valid"].all()
    assert_close(recorded["rows"][0], weights["layer 2"], 1e-5)
    assert_close(recorded["last"][0], weights["layer 2"][-1], 1e-5)


def test_fastv_keeps_the_top_of_layer_k_minus_1_last_row():
    model, llava = model_and_reference()
    ids, pixels = prompt(), images()
    kept, layer = 7, 3

    def fastv(sequence, weights):
        scores = weights.mean(dim=0)[-1]
        image = sequence.image_indices()
        top = sorted(sorted(image, key=lambda i: -float(scores[i]))[:kept])
        keep = [i for i in range(len(sequence.is_image)) if not sequence.is_image[i] or i in top]
        return sequence.select(keep, compact=False)

    expected_logits, stages = reference_prefill(llava, full_prompt(llava, ids, pixels), {layer - 1: fastv})
    out = run_method(model, "fastv", ids, pixels)
    assert kept_positions(output_cache(out), layer) == stages[layer]
    assert_close(out.logits[0, -1], expected_logits)
    assert output_cache(out).visual_token_counts == [(0, 3, NUM_PATCHES), (3, 8, kept)]


def reference_dpc_merge(tokens: torch.Tensor, num_clusters: int):
    """DPC-kNN as the spec states it, token by token."""
    n, d = tokens.shape
    distance = [[float((tokens[i] - tokens[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(x * x for x in sorted(row)[:num_clusters]) / num_clusters) for row in distance]
    largest = max(max(row) for row in distance)
    parent = [min([distance[i][j] for j in range(n) if density[j] > density[i]] or [largest]) for i in range(n)]
    score = [parent[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:num_clusters]
    members = {c: [c] for c in centres}
    for i in range(n):
        if i not in centres:
            members[min(centres, key=lambda c: distance[c][i])].append(i)
    return [(tokens[members[c]].sum(dim=0) / (len(members[c]) + 1e-6), c, members[c]) for c in centres]


def test_sparsevlm_matches_the_rater_rank_rule_and_recycling():
    model, llava = model_and_reference()
    ids, pixels = prompt(), images()
    options = OPTIONS["sparsevlm"]["token_reduction_options"]
    sequence = full_prompt(llava, ids, pixels)
    image, text = sequence.image_indices(), sequence.after_image()
    shares = (sequence.hidden[0, image] @ sequence.hidden[0, text].T).softmax(dim=-1).mean(dim=0)
    raters = {sequence.prompt_positions[text[i]] for i in range(len(text)) if shares[i] > shares.mean()}
    joined = []  # per recycling: each recycled token's prompt position -> its cluster centre's

    def sparsevlm(sequence, weights):
        attention = weights.mean(dim=0)
        image = sequence.image_indices()
        rows = [i for i, p in enumerate(sequence.prompt_positions) if p in raters]
        relation = attention[rows][:, image]
        rank = int(torch.linalg.matrix_rank(relation))
        if rank == len(image):
            return sequence
        relevance = relation.mean(dim=0)
        num_kept = min(int(rank * options["scale"] + options["bias"]), len(image) - 1)
        by_relevance = sorted(range(len(image)), key=lambda j: -float(relevance[j]))
        kept = sorted(by_relevance[:num_kept])
        dropped = [j for j in range(len(image)) if j not in kept]
        candidates = sorted(dropped, key=lambda j: -float(relevance[j]))[: int(len(dropped) * 0.3) + 1]
        merged = reference_dpc_merge(sequence.hidden[0, [image[j] for j in candidates]], len(candidates) // 10 + 1)
        position = [sequence.prompt_positions[image[j]] for j in candidates]
        new = [("new", token, position[c]) for token, c, _ in merged]
        joined.append({position[m]: position[c] for _, c, members in merged for m in members if m != c})
        before = list(range(image[0]))
        after = list(range(image[-1] + 1, len(sequence.is_image)))
        return sequence.select(before + [image[j] for j in kept] + new + after)

    expected_logits, stages = reference_prefill(llava, sequence, {layer: sparsevlm for layer in options["layers"]})
    out = run_method(model, "sparsevlm", ids, pixels)
    cache = output_cache(out)
    for layer in options["layers"]:
        assert kept_positions(cache, layer + 1) == stages[layer + 1]
    assert joined and len(stages[2]) < ids.shape[1]  # it pruned and recycled
    recorded = [
        {position: target for position, target in enumerate(merged[0].tolist()) if target >= 0}
        for _, merged in sorted(cache.merged_into_positions.items())
    ]
    assert recorded == joined
    assert_close(out.logits[0, -1], expected_logits)


def visionzip_reference(llava, pixels, dominant: int, contextual: int):
    inputs, attentions = eager_vision(llava, pixels)
    layer = llava.model.vision_tower.encoder.layers[FEATURE_LAYER]
    features = inputs[FEATURE_LAYER + 1][0]
    keys = layer.self_attn.k_proj(layer.layer_norm1(inputs[FEATURE_LAYER]))[0]
    keys = keys.view(keys.shape[0], 4, -1).mean(dim=1)  # head mean of the keys
    cls_scores = attentions[FEATURE_LAYER][:, 0, 1:].sum(dim=0)
    top = sorted(sorted(range(NUM_PATCHES), key=lambda j: -float(cls_scores[j]))[: dominant - 1])
    dominant_tokens = [0] + [j + 1 for j in top]
    rest = [i for i in range(NUM_PATCHES + 1) if i not in dominant_tokens]
    step = max(1, len(rest) // contextual)
    targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    joined = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            joined[max(targets, key=lambda t: float(unit[i] @ unit[t]))].append(i)
    contextual_tokens = [features[t] + (features[joined[t]].mean(dim=0) if joined[t] else 0) for t in targets]
    tokens = torch.cat([features[dominant_tokens], torch.stack(contextual_tokens)])
    # CLS stands for no patch: it takes the first placeholder no other token stands for.
    taken = top + [t - 1 for t in targets]
    sources = [min(set(range(NUM_PATCHES)) - set(taken))] + taken
    merged = {i - 1: t - 1 for t in targets for i in joined[t]}
    return project(llava, tokens), top, sources, merged


def test_visionzip_dominant_and_contextual_tokens():
    model, llava = model_and_reference()
    ids, pixels = prompt(), images()
    out = run_method(model, "visionzip", ids, pixels)
    settings = output_cache(out).token_reduction_report.settings
    assert (settings["dominant"], settings["contextual"]) == (8, 2)  # 10 in the 54:10 ratio
    with torch.no_grad():
        expected, dominant, sources, merged = visionzip_reference(llava, pixels, 8, 2)
        expected_logits, _ = reference_prefill(llava, prompt_with_features(llava, ids, expected, sources), {})
    assert output_cache(out).token_reduction_report.selected_patches[0].tolist() == dominant
    assert image_records(output_cache(out), ids) == (sources, merged)
    assert_close(output_image_features(out), expected)
    assert_close(out.logits[0, -1], expected_logits)


def test_fastervlm_keeps_the_top_cls_attention_patches():
    model, llava = model_and_reference()
    ids, pixels = prompt(), images()
    out = run_method(model, "fastervlm", ids, pixels)
    with torch.no_grad():
        inputs, attentions = eager_vision(llava, pixels)
        scores = attentions[FEATURE_LAYER][:, 0, 1:].mean(dim=0)
        top = sorted(sorted(range(NUM_PATCHES), key=lambda j: -float(scores[j]))[:9])
        expected = project(llava, inputs[FEATURE_LAYER + 1][0, 1:][top])
        expected_logits, _ = reference_prefill(llava, prompt_with_features(llava, ids, expected, top), {})
    assert output_cache(out).token_reduction_report.selected_patches[0].tolist() == top
    assert image_records(output_cache(out), ids) == (top, {})
    assert_close(output_image_features(out), expected)
    assert_close(out.logits[0, -1], expected_logits)


def reference_least_attended_merge(hidden: torch.Tensor, scores, candidates: list[int], num_merged: int):
    """iLLaVA: the num_merged + 1 least-scored candidates, weights num_merged+1 .. 1, into the most scored of them."""
    lowest = sorted(candidates, key=lambda i: float(scores[i]))[: num_merged + 1]
    weights = torch.arange(num_merged + 1, 0, -1, dtype=torch.float32)
    merged = (weights[:, None] * hidden[lowest]).sum(dim=0) / weights.sum()
    hidden = hidden.clone()
    hidden[lowest[-1]] = merged
    return hidden, [i for i in range(hidden.shape[0]) if i not in lowest[:-1]], lowest[-1]


def test_illava_merges_in_the_encoder_and_at_layer_k():
    model, llava = model_and_reference()
    ids, pixels = prompt(), images()
    options = OPTIONS["illava"]["token_reduction_options"]
    kept = OPTIONS["illava"]["num_kept_visual_tokens"]

    patch_of = list(range(NUM_PATCHES))  # the patch each remaining patch token is
    joined = {}  # merged patch -> the patch whose token it ended in

    def vit_merge(hidden, weights):
        received = weights.mean(dim=0).mean(dim=0)
        merged, keep, survivor = reference_least_attended_merge(hidden[0], received, list(range(1, hidden.shape[1])), 4)
        for token in range(1, hidden.shape[1]):
            if token not in keep:
                gone = patch_of[token - 1]
                for patch in [gone] + [p for p, target in joined.items() if target == gone]:
                    joined[patch] = patch_of[survivor - 1]
        patch_of[:] = [patch_of[token - 1] for token in keep[1:]]
        return merged[keep][None]

    def llm_merge(sequence, weights):
        scores = weights.mean(dim=0)[-1]
        image = sequence.image_indices()
        merged, keep, _ = reference_least_attended_merge(sequence.hidden[0], scores, image, len(image) - kept)
        sequence.hidden = merged[None]
        return sequence.select(keep, compact=False)

    with torch.no_grad():
        inputs, _ = eager_vision(llava, pixels, inside_layer={layer: vit_merge for layer in options["vit_layers"]})
        features = project(llava, inputs[FEATURE_LAYER + 1][0, 1:])
        expected_logits, stages = reference_prefill(
            llava, prompt_with_features(llava, ids, features, patch_of), {options["llm_layer"] - 1: llm_merge}
        )
    out = run_method(model, "illava", ids, pixels)
    assert output_image_features(out).shape[0] == NUM_PATCHES - 2 * 4
    assert image_records(output_cache(out), ids) == (patch_of, joined)
    assert_close(output_image_features(out), features)
    assert kept_positions(output_cache(out), options["llm_layer"]) == stages[options["llm_layer"]]
    assert_close(out.logits[0, -1], expected_logits)


def mustdrop_vision_reference(llava, pixels, threshold: float):
    """The 2x2 window merge after encoder layer 0 and the key set of the last layer, as the spec states them."""
    def window_merge(hidden, weights):
        cls_token, patches = hidden[0, 0], hidden[0, 1:]
        windows = []
        for row in range(0, GRID, 2):
            for column in range(0, GRID, 2):
                members = [r * GRID + c for r in (row, row + 1) for c in (column, column + 1)]
                unit = nn.functional.normalize(patches[members], dim=-1)
                similarity = unit @ unit.T
                windows.append(((similarity.sum() - similarity.trace()) / 12, members))
        chosen = sorted([w for w in windows if w[0] >= threshold], key=lambda w: -float(w[0]))
        merged_members = {m for _, members in chosen for m in members}
        rest = [i for i in range(NUM_PATCHES) if i not in merged_members]
        # A merged window stands for its bottom-right patch, where the released code writes the mean.
        sources[:] = [members[-1] for _, members in chosen] + rest
        joined.update({m: members[-1] for _, members in chosen for m in members[:-1]})
        merged = [patches[members].mean(dim=0) for _, members in chosen]
        return torch.stack([cls_token, *merged, *patches[rest]])[None]

    sources, joined = [], {}
    inputs, attentions = eager_vision(llava, pixels, after_layer={0: window_merge})
    cls_attention = attentions[-1].mean(dim=0)[0, 1:]
    num_key = math.ceil(0.08 * cls_attention.shape[0])
    key_set = sorted(range(cls_attention.shape[0]), key=lambda j: -float(cls_attention[j]))[:num_key]
    return project(llava, inputs[FEATURE_LAYER + 1][0, 1:]), key_set, sources, joined


def test_mustdrop_window_merge_key_set_dual_filter_and_cache_trim():
    model, llava = model_and_reference()
    ids, pixels = prompt(), images()
    options = dict(OPTIONS["mustdrop"]["token_reduction_options"])
    with torch.no_grad():  # a threshold that merges some windows: the median window similarity
        hidden = eager_vision(llava, pixels)[0][1][0, 1:]
        grid = hidden.view(GRID // 2, 2, GRID // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(9, 4, -1)
        unit = nn.functional.normalize(grid, dim=-1)
        similarity = unit @ unit.transpose(1, 2)
        window_similarity = ((similarity.sum((1, 2)) - 4) / 12).sort().values
        options["similarity_threshold"] = float(window_similarity[3:5].mean())  # between the 4th and 5th: merges 5
        features, key_set, sources, joined = mustdrop_vision_reference(llava, pixels, options["similarity_threshold"])
    sequence = prompt_with_features(llava, ids, features, sources)
    key_positions = {sequence.prompt_positions[sequence.image_indices()[j]] for j in key_set}
    dropped_any = []

    def dual_filter(sequence, weights):
        attention = weights.mean(dim=0)[sequence.after_image()][:, sequence.image_indices()]
        received, largest = attention.sum(dim=0), attention.max(dim=0).values
        keep = []
        for i in range(len(sequence.is_image)):
            if sequence.is_image[i]:
                j = sequence.image_indices().index(i)
                low = received[j] < received.sum() * options["global_threshold"]
                low = low and largest[j] < options["individual_threshold"]
                if low and sequence.prompt_positions[i] not in key_positions:
                    dropped_any.append(i)
                    continue
            keep.append(i)
        return sequence.select(keep)

    with torch.no_grad():
        expected_logits, stages = reference_prefill(llava, sequence, {layer: dual_filter for layer in options["layers"]})
        out = model(
            input_ids=ids,
            pixel_values=pixels,
            token_reduction="mustdrop",
            token_reduction_options=options,
            use_cache=True,
        )
    assert output_image_features(out).shape[0] < NUM_PATCHES and dropped_any  # windows merged and tokens dropped
    assert_close(output_image_features(out), features)
    assert_close(out.logits[0, -1], expected_logits)
    cache = output_cache(out)
    assert image_records(cache, ids) == (sources, joined)
    # After the prefill, layers from the first pruning layer on all hold the final set (the KV trim).
    final = stages[options["layers"][-1] + 1]
    first = options["layers"][0]
    assert cache.group_starts == [0, first]
    assert kept_positions(cache, first) == final
    assert [cache.get_seq_length(i) for i in range(8)] == [len(sequence.is_image)] * first + [len(final)] * (8 - first)


def test_random_and_pooling_at_the_vision_output():
    model, llava = model_and_reference()
    ids, pixels = prompt(), images()
    with torch.no_grad():
        patches = project(llava, eager_vision(llava, pixels)[0][FEATURE_LAYER + 1][0, 1:])
    out = run_method(model, "random", ids, pixels)
    chosen = torch.randperm(NUM_PATCHES, generator=torch.Generator().manual_seed(3))[:8].sort().values
    assert torch.equal(output_cache(out).token_reduction_report.selected_patches[0], chosen)
    assert image_records(output_cache(out), ids) == (chosen.tolist(), {})
    assert_close(output_image_features(out), patches[chosen])

    out = run_method(model, "pooling", ids, pixels)  # 6 tokens: a 2 x 3 grid of 3 x 2 windows
    grid = patches.view(GRID, GRID, -1)
    expected = torch.stack([grid[r : r + 3, c : c + 2].mean(dim=(0, 1)) for r in (0, 3) for c in (0, 2, 4)])
    assert_close(output_image_features(out), expected)
    sources = [r * GRID + c for r in (0, 3) for c in (0, 2, 4)]  # each window's first patch
    joined = {r * GRID + c: (r // 3 * 3) * GRID + c // 2 * 2 for r in range(GRID) for c in range(GRID)}
    assert image_records(output_cache(out), ids) == (sources, {p: t for p, t in joined.items() if p != t})
    with torch.no_grad():
        expected_logits, _ = reference_prefill(llava, prompt_with_features(llava, ids, expected, sources), {})
    assert_close(out.logits[0, -1], expected_logits)


@pytest.mark.parametrize("name", ["visionzip", "fastervlm", "random", "pooling"])
def test_vision_side_generation_is_llava_on_the_reduced_prompt(name):
    """After a vision-output reduction the model is LLaVA on a shorter prompt: its greedy decoding must match."""
    model, llava = model_and_reference("sdpa")
    ids, pixels = prompt(), images()
    out = model.generate(
        input_ids=ids, pixel_values=pixels, token_reduction=name, max_new_tokens=5, do_sample=False,
        speculative_decoding=False, return_dict_in_generate=True, **OPTIONS[name],
    )
    features = output_image_features(model(input_ids=ids, pixel_values=pixels, token_reduction=name, **OPTIONS[name]))
    with torch.no_grad():
        embeddings = prompt_with_features(llava, ids, features).hidden
    expected = llava.generate(inputs_embeds=embeddings, max_new_tokens=5, do_sample=False)
    assert torch.equal(out.sequences[:, ids.shape[1] :], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Budgets: the settings for 64/128/192 at LLaVA-1.5 sizes (576 image tokens, 32 layers, 24-layer CLIP), no model built
# ---------------------------------------------------------------------------------------------------------------------


def llava15_config() -> TwigVLMConfig:
    return TwigVLMConfig(
        vision_config={**VISION_CONFIG, "num_hidden_layers": 24, "image_size": 336},
        text_config=text_config(32),
        image_token_index=IMAGE_TOKEN_ID,
        twig_attach_layer=2,
        num_twig_layers=3,
        final_wipe_layer=24,
    )


def plan(entering: int, kept: int | None = None, first_pruned: int = 32, wiped: int = 32) -> list[int]:
    """Visual tokens per layer of a 32-layer model: `entering` up to `first_pruned`, `kept` up to `wiped`, 0 after."""
    return [entering] * first_pruned + [kept] * (wiped - first_pruned) + [0] * (32 - wiped)


# method: {budget: (the settings that matter, the visual tokens of each of the 32 layers, or None when adaptive)}
LLAVA15_BUDGETS = {
    "twig": {b: ({}, plan(576, kept, 2, 24)) for b, kept in ((64, 41), (128, 134), (192, 227))},
    "fastv": {b: (dict(layer=2), plan(576, kept, 2)) for b, kept in ((64, 30), (128, 98), (192, 166))},
    "sparsevlm": {
        b: (dict(layers=(2, 6, 15, 19), scale=scale, bias=bias), None)
        for b, scale, bias in ((64, 0.8, 0.0), (128, 9.0, 6.0), (192, 13.5, 0.0))
    },
    "visionzip": {
        b: (dict(dominant=d, contextual=c), plan(b)) for b, d, c in ((64, 54, 10), (128, 108, 20), (192, 162, 30))
    },
    "fastervlm": {b: (dict(kept=b), plan(b)) for b in (64, 128, 192)},
    "illava": {
        b: (dict(vit_layers=(5, 6, 7, 8), vit_merges=72, llm_layer=2), plan(288, kept, 2))
        for b, kept in ((64, 49), (128, 117), (192, 186))
    },
    "mustdrop": {
        b: (dict(global_threshold=g, individual_threshold=i, layers=(2, 6, 10, 14), window=3), None)
        for b, g, i in ((64, 0.011, 0.01), (128, 0.0012, 0.001), (192, 0.001, 0.001))
    },
    "random": {b: (dict(kept=b), plan(b)) for b in (64, 128, 192)},
    "pooling": {b: (dict(grid=grid), plan(b)) for b, grid in ((64, (8, 8)), (128, (8, 16)), (192, (12, 16)))},
}


@pytest.mark.parametrize("name", LLAVA15_BUDGETS)
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_budget_settings_at_llava15_sizes(name, budget):
    settings, per_layer = LLAVA15_BUDGETS[name][budget]
    strategy = build_token_reduction(llava15_config(), name, visual_token_budget=budget)
    assert {key: strategy.settings[key] for key in settings} == settings
    assert strategy.planned_visual_tokens(576) == per_layer  # None: adaptive, the realised counts are reported
    if per_layer is not None:
        assert abs(sum(per_layer) / 32 - budget) < 1  # "64" is 64 in the method's own accounting


def test_reported_counts_follow_the_plan():
    model, _ = model_and_reference()
    ids, pixels = prompt(), images()
    for name in ("twig", "fastv", "visionzip", "fastervlm", "illava", "random", "pooling", "none"):
        report = output_cache(run_method(model, name, ids, pixels)).token_reduction_report
        strategy = build_token_reduction(
            model.config,
            name,
            OPTIONS[name].get("token_reduction_options"),
            OPTIONS[name].get("visual_token_budget"),
            OPTIONS[name].get("num_kept_visual_tokens"),
        )
        planned = strategy.planned_visual_tokens(NUM_PATCHES)
        assert report.visual_tokens_per_layer == [planned], name
        assert report.visual_tokens_entering_llm == [planned[0]]
        assert report.mean_visual_tokens_per_layer == [sum(planned) / 8]


def test_bad_names_options_and_budgets_are_errors():
    model, _ = model_and_reference()
    ids, pixels = prompt(), images()
    with pytest.raises(ValueError, match="choose one of twig, none, fastv"):
        model(input_ids=ids, pixel_values=pixels, token_reduction="fastest")
    with pytest.raises(ValueError, match="unknown option.*'rank'.*valid options: layer"):
        model(input_ids=ids, pixel_values=pixels, token_reduction="fastv", token_reduction_options={"rank": 3})
    with pytest.raises(ValueError, match="takes no options"):
        model(input_ids=ids, pixel_values=pixels, token_reduction="twig", token_reduction_options={"layer": 3})
    with pytest.raises(ValueError, match="published settings for visual_token_budget 64, 128, 192"):
        model(input_ids=ids, pixel_values=pixels, token_reduction="sparsevlm", visual_token_budget=100)
    with pytest.raises(ValueError, match="adaptive"):
        model(input_ids=ids, pixel_values=pixels, token_reduction="mustdrop", num_kept_visual_tokens=10)
    with pytest.raises(ValueError, match="below"):  # R̄ under what layers 0..K-1 already spend
        model(input_ids=ids, pixel_values=pixels, token_reduction="fastv", visual_token_budget=2)
    with pytest.raises(ValueError, match="speculative"):
        model.generate(input_ids=ids, pixel_values=pixels, token_reduction="fastv", speculative_decoding=True)


# ---------------------------------------------------------------------------------------------------------------------
# sdpa = eager, batches = single runs, and the cache after generation
# ---------------------------------------------------------------------------------------------------------------------


def kept_record(cache):
    report = cache.token_reduction_report
    return (
        {start: kept.tolist() for start, kept in cache.kept_prompt_positions.items()},
        [p.tolist() for p in report.selected_patches or []],
        report.visual_tokens_per_layer,
    )


@pytest.mark.parametrize("name", TOKEN_REDUCTIONS)
def test_sdpa_and_eager_keep_the_same_tokens(name):
    ids, pixels = prompt(), images()
    results = []
    for attn_implementation in ("eager", "sdpa"):
        model, _ = model_and_reference(attn_implementation)
        out = run_method(model, name, ids, pixels)
        results.append((kept_record(output_cache(out)), out.logits[0, -1]))
    assert results[0][0] == results[1][0]
    assert_close(results[0][1], results[1][1])


def expected_cache_lengths(cache, prompt_length: int, num_fed: int) -> list[int]:
    """Per base layer: the prompt tokens its group kept (padding slots included) plus the tokens fed back."""
    lengths = []
    for start, end in cache.layer_groups:
        kept = cache.kept_prompt_positions.get(start)
        lengths += [(prompt_length if kept is None else kept.shape[1]) + num_fed] * (end - start)
    return lengths


@pytest.mark.parametrize("name", TOKEN_REDUCTIONS)
def test_batch_generation_equals_single_runs(name):
    model, _ = model_and_reference("sdpa")
    prompts = [prompt(2, 4, seed=1), prompt(5, 6, seed=2), prompt(1, 3, seed=3)]
    pixels = images(3, seed=4)
    width = max(p.shape[1] for p in prompts)
    batch = torch.full((3, width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for row, ids in enumerate(prompts):
        batch[row, width - ids.shape[1] :] = ids[0]
        attention_mask[row, width - ids.shape[1] :] = 1
    kwargs = dict(
        token_reduction=name, max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID, speculative_decoding=False,
        return_dict_in_generate=True, **OPTIONS[name],
    )
    batched = model.generate(input_ids=batch, attention_mask=attention_mask, pixel_values=pixels, **kwargs)
    cache = output_cache(batched)
    assert [cache.get_seq_length(i) for i in range(8)] == expected_cache_lengths(cache, width, 4)
    report = cache.token_reduction_report
    for row, ids in enumerate(prompts):
        single = model.generate(input_ids=ids, pixel_values=pixels[row : row + 1], **kwargs)
        assert torch.equal(batched.sequences[row, width:], single.sequences[0, ids.shape[1] :]), row
        single_cache = output_cache(single)
        assert [single_cache.get_seq_length(i) for i in range(8)] == expected_cache_lengths(
            single_cache, ids.shape[1], 4
        )
        assert report.visual_tokens_per_layer[row] == single_cache.token_reduction_report.visual_tokens_per_layer[0]
