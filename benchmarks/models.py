"""
The benchmark's models: one TwigVLM with random weights whose self-speculative acceptance is under control, and
transformers' LLaVA holding the very same base tensors.

Random weights accept almost no draft, and acceptance decides SSD's speed, so the model is reshaped without changing
any shape or any per-layer cost: base layers from K + T on are scaled down until they barely move the residual
stream, the twig becomes a copy of layers K..K+T-1 with the base's norm and head (so the draft predicts what the full
model predicts), and noise on the twig's head then brings acceptance down to a chosen rate.
"""

import math
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration


@dataclass(frozen=True)
class Size:
    """Shapes of one benchmark model, the prompt around its image, and how long the run takes."""

    name: str
    vision: dict
    text: dict
    twig_attach_layer: int
    num_twig_layers: int
    final_wipe_layer: int
    budgets: tuple[float, ...]  # R̄ of the TTP rows, largest first; the smallest is the SSD rows' budget
    text_before_image: int  # LLaVA-1.5's system prompt and "USER:" before <image>
    text_after_image: int  # the question and "ASSISTANT:"
    answer_lengths: tuple[int, ...]
    calibration_length: int  # answer length used while tuning the twig head to a target acceptance
    repeats: int
    image_token_id: int = -1  # -1: the last id of the vocabulary

    @property
    def num_image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


def _clip(hidden: int, intermediate: int, layers: int, heads: int, image_size: int = 336) -> dict:
    return dict(
        model_type="clip_vision_model",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


SIZES = {
    # Seconds on a CPU: the smoke test's size. Budgets fit its 16 image tokens (R = 12 / 8 / 4).
    "tiny": Size(
        name="tiny",
        vision=_clip(32, 64, 2, 4, image_size=56),
        text=_llama(64, 128, 8, 4, 2, 512),
        twig_attach_layer=2,
        num_twig_layers=2,
        final_wipe_layer=6,
        budgets=(10, 8, 6),
        text_before_image=4,
        text_after_image=4,
        answer_lengths=(2, 6),
        calibration_length=8,
        repeats=1,
    ),
    # Minutes on 2 CPU cores, at a narrow width: 576 image tokens and half of LLaVA-1.5-7B's layers with K, F halved
    # too (16 layers, K=1, F=12), so that R̄ 192 / 128 / 64 keep the 7B's R = 227 / 134 / 41; T=2 (the 7B's 3 halved,
    # rounded up). A vocabulary of 2048 keeps the LM head at the 7B's share of a layer (0.65): with 32k entries the
    # narrow model's head would weigh 10 layers, and drafting (which runs the twig's head) would cost half a full step.
    "small": Size(
        name="small",
        vision=_clip(128, 512, 4, 4),
        text=_llama(256, 688, 16, 4, 4, 2048),
        twig_attach_layer=1,
        num_twig_layers=2,
        final_wipe_layer=12,
        budgets=(192, 128, 64),
        text_before_image=35,
        text_after_image=20,
        answer_lengths=(10, 100, 500),
        calibration_length=64,
        repeats=3,
    ),
    # LLaVA-1.5-7B: CLIP ViT-L/336 + a 32-layer, 4096-wide LLaMA, for a GPU.
    "llava-1.5-7b": Size(
        name="llava-1.5-7b",
        vision=_clip(1024, 4096, 24, 16),
        text=_llama(4096, 11008, 32, 32, 32, 32064),
        twig_attach_layer=2,
        num_twig_layers=3,
        final_wipe_layer=24,
        budgets=(192, 128, 64),
        text_before_image=35,
        text_after_image=20,
        answer_lengths=(10, 100, 500),
        calibration_length=100,
        repeats=3,
        image_token_id=32000,
    ),
}


def twigvlm_config(size: Size) -> TwigVLMConfig:
    vocab = size.text["vocab_size"]
    return TwigVLMConfig(
        vision_config=size.vision,
        text_config=size.text,
        image_token_index=size.image_token_id % vocab,
        image_seq_length=size.num_image_tokens,
        projector_hidden_act="gelu",
        twig_attach_layer=size.twig_attach_layer,
        num_twig_layers=size.num_twig_layers,
        final_wipe_layer=size.final_wipe_layer,
    )


def build_twigvlm(
    size: Size,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
    seed: int = 0,
    deep_layer_scale: float = 1e-3,
    attention_scale: float = 0.1,
    logit_std: float = 12.0,
) -> TwigVLMForConditionalGeneration:
    """A random TwigVLM of `size`, built directly on `device`, made acceptance-controllable (see the module doc)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = TwigVLMForConditionalGeneration._from_config(twigvlm_config(size), dtype=dtype)
    model.eval().requires_grad_(False)
    model.set_attn_implementation(attn_implementation)
    make_draft_match_full_model(model, deep_layer_scale, attention_scale, logit_std)
    return model


@torch.no_grad()
def make_draft_match_full_model(
    model: TwigVLMForConditionalGeneration, deep_layer_scale: float, attention_scale: float, logit_std: float
) -> None:
    """
    Give the language model weights whose greedy answers vary, then make the draft predict what the full model does.

    Default-initialised layers (std 0.02) add a near-constant vector to every position and the greedy answer repeats
    one token, so acceptance could only be all or nothing. Instead the embeddings get unit variance and every linear
    layer std 1/√fan_in: each token's own embedding then steers the next prediction and answers vary. Base layers ≥ K + T
    are scaled down by `deep_layer_scale`; the twig becomes a copy of layers K..K+T-1 with the base's norm and head; the
    head is sharpened to logits of standard deviation `logit_std` (the norm's output has unit RMS), so that the draft
    is about as confident as a trained model's and the 0.6 confidence stop does not end every draft at one token.
    """
    config = model.config
    k, t = config.twig_attach_layer, config.num_twig_layers
    language_model, twig = model.model.language_model, model.model.twig
    language_model.embed_tokens.weight.normal_(0, 1)
    for linear in language_model.layers.modules():
        if isinstance(linear, torch.nn.Linear):
            linear.weight.normal_(0, linear.in_features**-0.5)
    for layer in language_model.layers:
        layer.self_attn.o_proj.weight.mul_(attention_scale)
    for layer in language_model.layers[k + t :]:
        layer.self_attn.o_proj.weight.mul_(deep_layer_scale)
        layer.mlp.down_proj.weight.mul_(deep_layer_scale)
    model.lm_head.weight.normal_(0, logit_std / math.sqrt(model.lm_head.in_features))
    for twig_layer, base_layer in zip(twig.layers, language_model.layers[k : k + t]):
        twig_layer.load_state_dict(base_layer.state_dict())
    twig.norm.load_state_dict(language_model.norm.state_dict())
    twig.lm_head.weight.copy_(model.lm_head.weight)


@torch.no_grad()
def set_twig_head_noise(model: TwigVLMForConditionalGeneration, relative_noise: float, seed: int = 1) -> None:
    """The twig's head = the base head + `relative_noise` × its standard deviation × fixed Gaussian noise."""
    head = model.lm_head.weight
    generator = torch.Generator(device=head.device).manual_seed(seed)
    noise = torch.randn(head.shape, generator=generator, device=head.device, dtype=head.dtype)
    model.model.twig.lm_head.weight.copy_(head + noise * (relative_noise * head.float().std().item()))


def llava_with_same_base(model: TwigVLMForConditionalGeneration) -> LlavaForConditionalGeneration:
    """
    transformers' LLaVA holding our base tensors themselves (no copy: one set of weights in memory).

    Loading them with `strict=True` shows that the base of a TwigVLM is a LLaVA checkpoint under LLaVA's own names.
    """
    config = model.config
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_index,
        image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
    )
    parameter = next(model.parameters())
    with torch.device(parameter.device):
        llava = LlavaForConditionalGeneration._from_config(llava_config, dtype=parameter.dtype)
    base_state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("model.twig.")}
    llava.load_state_dict(base_state, strict=True, assign=True)
    llava.eval().requires_grad_(False)
    llava.set_attn_implementation(model.config._attn_implementation)
    return llava


def benchmark_inputs(size: Size, model: TwigVLMForConditionalGeneration, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt (text, <image> expanded, text) and one image, the same for every configuration."""
    config = model.config
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    vocab, image_id = config.text_config.vocab_size, config.image_token_index

    def text(length: int) -> torch.Tensor:
        return torch.randint(3, min(vocab, image_id), (length,), generator=generator)

    input_ids = torch.cat(
        [
            torch.tensor([config.text_config.bos_token_id]),
            text(size.text_before_image - 1),
            torch.full((size.num_image_tokens,), image_id),
            text(size.text_after_image),
        ]
    )[None]
    image_size = size.vision["image_size"]
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=generator)
    return {
        "input_ids": input_ids.to(parameter.device),
        "attention_mask": torch.ones_like(input_ids, device=parameter.device),
        "pixel_values": pixel_values.to(parameter.device, parameter.dtype),
    }


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())
