"""Tiny TwigVLM and LLaVA models built in the tests, with the same base weights (no download)."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration


IMAGE_SIZE, PATCH_SIZE = 56, 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
VOCAB_SIZE = 120
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
PAD_TOKEN_ID = 0

VISION_CONFIG = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    projection_dim=32,
)


def text_config(num_layers: int = 8) -> dict:
    return dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
    )


def tiny_config(num_layers: int = 8, **twig_fields) -> TwigVLMConfig:
    fields = dict(twig_attach_layer=2, num_twig_layers=2, final_wipe_layer=6)
    fields.update(twig_fields)
    return TwigVLMConfig(
        vision_config=VISION_CONFIG,
        text_config=text_config(num_layers),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=NUM_IMAGE_TOKENS,
        **fields,
    )


def tiny_twigvlm(config: TwigVLMConfig | None = None, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = config or tiny_config()
    model = TwigVLMForConditionalGeneration(config).eval()
    # Random twig and base alike; larger-than-default weights make attention peaked, so rankings have no near-ties.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "embeddings" not in name:
                parameter.normal_(0, 0.08)
    model.set_attn_implementation(attn_implementation)
    return model


def llava_with_same_base(model: TwigVLMForConditionalGeneration, attn_implementation: str = "sdpa"):
    """transformers' own LLaVA holding our base weights: loading them strictly proves the names are LLaVA's."""
    config = model.config
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_index,
        image_seq_length=config.image_seq_length,
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    base_state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("model.twig.")}
    llava.load_state_dict(base_state, strict=True)
    llava.set_attn_implementation(attn_implementation)
    return llava


def prompt_ids(num_text_before: int = 3, num_text_after: int = 4, seed: int = 0, image: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(1, IMAGE_TOKEN_ID, (num_text_before,), generator=generator)
    after = torch.randint(1, IMAGE_TOKEN_ID, (num_text_after,), generator=generator)
    image_tokens = torch.full((NUM_IMAGE_TOKENS if image else 0,), IMAGE_TOKEN_ID)
    return torch.cat([before, image_tokens, after])[None]


def pixel_values(batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def twig_copy_of_deep_layers(attn_implementation: str = "sdpa", noise: float = 0.0, seed: int = 0):
    """L = K + T and the twig a copy of layers K..L-1, norm and head: without pruning the draft is the full model."""
    config = tiny_config(num_layers=4, twig_attach_layer=2, num_twig_layers=2, final_wipe_layer=None)
    model = tiny_twigvlm(config, attn_implementation, seed=seed)
    twig, language_model = model.model.twig, model.model.language_model
    with torch.no_grad():
        for twig_layer, base_layer in zip(twig.layers, language_model.layers[2:]):
            twig_layer.load_state_dict(base_layer.state_dict())
        twig.norm.load_state_dict(language_model.norm.state_dict())
        twig.lm_head.weight.copy_(model.lm_head.weight)
        twig.lm_head.weight.add_(noise * torch.randn(twig.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    return model
