"""
Analytic FLOPs and bytes of a prefill and of a decoded token, so that measured times can be set against the device's
measured matmul rate and memory bandwidth.

What is counted: matmul FLOPs (2 per multiply-add) of every linear layer and of attention (causal pairs only, as a
kernel that skips masked blocks does; bidirectional in the vision tower), and bytes of the weights each pass reads
once plus the KV cache it reads. Not counted: norms, activations, rotary embeddings, softmax, embedding lookups and
activation traffic, all small beside the above at batch 1.
"""

from dataclasses import dataclass

from twigvlm import TwigVLMConfig


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, factor: float) -> "Cost":
        return Cost(self.flops * factor, self.bytes * factor)

    __rmul__ = __mul__


@dataclass(frozen=True)
class Shapes:
    """The sizes the counts need, read from a TwigVLM config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    num_layers: int
    attach_layer: int
    num_twig_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    num_patches: int
    patch_size: int
    num_image_tokens: int
    element_bytes: int

    @classmethod
    def from_config(cls, config: TwigVLMConfig, element_bytes: int) -> "Shapes":
        text, vision = config.text_config, config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            vocab=text.vocab_size,
            num_layers=text.num_hidden_layers,
            attach_layer=config.twig_attach_layer,
            num_twig_layers=config.num_twig_layers,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            num_patches=(vision.image_size // vision.patch_size) ** 2,
            patch_size=vision.patch_size,
            num_image_tokens=config.image_seq_length,
            element_bytes=element_bytes,
        )

    @property
    def layer_weights(self) -> int:
        """Weights of one decoder layer: q, k, v, o, gate, up, down and two norms."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def head_weights(self) -> int:
        return self.hidden * self.vocab


def decoder_layer(shapes: Shapes, new_tokens: float, past_tokens: float) -> Cost:
    """One LLaMA decoder layer on `new_tokens` queries after `past_tokens` cached ones (causal)."""
    linear = shapes.layer_weights - 2 * shapes.hidden
    pairs = new_tokens * past_tokens + new_tokens * (new_tokens + 1) / 2
    flops = 2 * new_tokens * linear + 4 * shapes.heads * shapes.head_dim * pairs
    kv_bytes = 2 * shapes.kv_heads * shapes.head_dim * (past_tokens + new_tokens) * shapes.element_bytes
    return Cost(flops, shapes.layer_weights * shapes.element_bytes + kv_bytes)


def lm_head(shapes: Shapes, tokens: float) -> Cost:
    return Cost(2 * tokens * shapes.head_weights, shapes.head_weights * shapes.element_bytes)


def vision(shapes: Shapes) -> Cost:
    """CLIP patch embedding and every encoder layer (transformers runs them all), then LLaVA's 2-layer projector."""
    d, n = shapes.vision_hidden, shapes.num_patches + 1  # + the class token
    patch = 3 * shapes.patch_size**2 * d
    layer = 4 * d * d + 2 * d * shapes.vision_intermediate
    projector = d * shapes.hidden + shapes.hidden * shapes.hidden
    flops = (
        2 * shapes.num_patches * patch
        + shapes.vision_layers * (2 * n * layer + 4 * d * n * n)
        + 2 * shapes.num_image_tokens * projector
    )
    return Cost(flops, (patch + shapes.vision_layers * layer + projector) * shapes.element_bytes)


def tokens_entering(group_tokens: list[tuple[int, int, int]], layer: int) -> int:
    """Prompt tokens in the hidden states that enter `layer` (those layer - 1 held), which the twig reads at K."""
    return next(tokens for first, end, tokens in group_tokens if first <= layer - 1 < end)


def prefill(
    shapes: Shapes, group_tokens: list[tuple[int, int, int]], twig_runs: bool, twig_scores: bool
) -> Cost:
    """
    Vision, the base layers as the prefill grouped them — `(first, end, tokens)` — and the LM head on the last token.

    `twig_runs`: the twig's layers ran on the tokens entering layer K (pruning, or self-speculative decoding keeping
    its KV); `twig_scores`: twig-guided pruning also computed one attention row of its last layer.
    """
    cost = vision(shapes) + lm_head(shapes, 1)
    for first, end, tokens in group_tokens:
        cost += (end - first) * decoder_layer(shapes, tokens, 0)
    if twig_runs:
        attach_tokens = tokens_entering(group_tokens, shapes.attach_layer)
        cost += shapes.num_twig_layers * decoder_layer(shapes, attach_tokens, 0)
        if twig_scores:
            query = 2 * shapes.hidden * shapes.heads * shapes.head_dim
            cost += Cost(query + 2 * shapes.heads * shapes.head_dim * attach_tokens, 0)
    return cost


@dataclass(frozen=True)
class Speculation:
    """What one self-speculative generation did: verification rounds with drafts, drafted and accepted tokens."""

    rounds: int
    drafted: int
    accepted: int


def decode_per_token(
    shapes: Shapes,
    group_prompt_tokens: list[tuple[int, int, int]],
    answer_length: int,
    speculation: Speculation | None = None,
) -> Cost:
    """
    Mean cost of one decoded token over an answer of `answer_length` tokens (the first comes from the prefill).

    Without speculation every token runs the base layers and the head once, at a context that grows by one per token;
    the cost is linear in the context, so the mean context gives the exact mean. With speculation the counts come from
    the run: each draft runs layers 0..K-1, the twig and its head on one token; each verifier pass runs layers 0..K-1
    and the twig on its last token only, layers ≥ K and the head on the token before the drafts plus the drafts.
    """
    decoded = answer_length - 1
    if decoded <= 0:
        return Cost()
    mean_past = (decoded - 1) / 2
    k = shapes.attach_layer
    shallow_prompt = tokens_entering(group_prompt_tokens, k)
    if speculation is None:
        cost = lm_head(shapes, 1)
        for first, end, tokens in group_prompt_tokens:
            cost += (end - first) * decoder_layer(shapes, 1, tokens + mean_past)
        return cost

    verifier_passes = speculation.rounds + max(0, decoded - speculation.accepted - speculation.rounds)
    tokens_per_pass = (speculation.drafted + verifier_passes) / verifier_passes
    verify = lm_head(shapes, tokens_per_pass)
    verify += shapes.num_twig_layers * decoder_layer(shapes, 1, shallow_prompt + mean_past)
    for first, end, tokens in group_prompt_tokens:
        for layer in range(first, end):
            new = 1 if layer < k else tokens_per_pass
            verify += decoder_layer(shapes, new, tokens + mean_past)
    draft = lm_head(shapes, 1) + (k + shapes.num_twig_layers) * decoder_layer(shapes, 1, shallow_prompt + mean_past)
    return (verifier_passes * verify + speculation.drafted * draft) * (1 / decoded)
