"""The TwigVLM config of a conversion, from the original LLaVA-1.5 config or a llava-hf one, plus the twig settings."""

import math
from dataclasses import dataclass

from transformers import CLIPVisionConfig, LlavaConfig

from twigvlm import TwigVLMConfig


# Text-model fields of the original (Vicuna/LLaMA) config.json that carry over; its LLaVA training fields do not.
LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "mlp_bias",
    "head_dim",
)
# LLaVA-1.5's image settings; another value means a model this converter does not reproduce exactly.
ORIGINAL_REQUIREMENTS = {
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "mm_patch_merge_type": "flat",
    "image_aspect_ratio": "pad",
}
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}


@dataclass(frozen=True)
class TwigSettings:
    """What the twig files do not record: where it attaches, FinalWipe and the default budget."""

    twig_attach_layer: int
    final_wipe_layer: int | None
    visual_token_budget: float


def padded_vocab_size(num_tokens: int, multiple: int) -> int:
    return math.ceil(num_tokens / multiple) * multiple


def text_config_from_original(original: dict, vocab_size: int) -> dict:
    if original.get("rope_scaling"):
        raise ValueError(f"rope_scaling={original['rope_scaling']} is not supported; LLaVA-1.5 has none.")
    if original.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings=True is not supported; LLaVA-1.5 has a separate LM head.")
    text_config = {field: original[field] for field in LLAMA_FIELDS if original.get(field) is not None}
    if "rope_theta" in original:
        text_config["rope_parameters"] = {"rope_type": "default", "rope_theta": original["rope_theta"]}
    return {"model_type": "llama", **text_config, "vocab_size": vocab_size}


def config_from_original(
    original: dict, vision_config: CLIPVisionConfig, twig: TwigSettings, num_twig_layers: int, vocab_multiple: int
) -> TwigVLMConfig:
    """
    The original config.json (`LlavaLlamaForCausalLM`, whose `model_type` "llava" means something else to
    transformers, so it is read as plain JSON) and the CLIP tower's config, as a TwigVLM config. `<image>` becomes
    the token after the original vocabulary, padded to `vocab_multiple` rows.
    """
    for field, required in ORIGINAL_REQUIREMENTS.items():
        if original.get(field, required) != required:
            raise ValueError(f"The LLaVA config sets {field}={original[field]!r}; only {required!r} (LLaVA-1.5) is supported.")
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_STRATEGIES:
        raise ValueError(f"mm_vision_select_feature={select_feature!r} is unknown; expected one of {list(SELECT_STRATEGIES)}.")
    if original.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ValueError(
            f"The LLaVA projector expects vision features of size {original['mm_hidden_size']}, but the vision tower's "
            f"hidden size is {vision_config.hidden_size}: it is not the tower this LLaVA was trained with."
        )
    image_token_index = original["vocab_size"]
    return TwigVLMConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config_from_original(original, padded_vocab_size(image_token_index + 1, vocab_multiple)),
        image_token_index=image_token_index,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_STRATEGIES[select_feature],
        multimodal_projector_bias=True,
        **twig_fields(twig, num_twig_layers),
    )


LLAVA_FIELDS = (
    "image_token_index",
    "image_seq_length",
    "projector_hidden_act",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "multimodal_projector_bias",
)


def llava_fields(config: LlavaConfig) -> dict:
    """The fields a plain LLaVA config and a TwigVLM config share."""
    fields = {field: getattr(config, field) for field in LLAVA_FIELDS}
    return {"vision_config": config.vision_config.to_dict(), "text_config": config.text_config.to_dict(), **fields}


def config_from_llava_hf(llava_config: LlavaConfig, twig: TwigSettings, num_twig_layers: int) -> TwigVLMConfig:
    return TwigVLMConfig(**llava_fields(llava_config), **twig_fields(twig, num_twig_layers))


def twig_fields(twig: TwigSettings, num_twig_layers: int) -> dict:
    return {
        "twig_attach_layer": twig.twig_attach_layer,
        "num_twig_layers": num_twig_layers,
        "final_wipe_layer": twig.final_wipe_layer,
        "visual_token_budget": twig.visual_token_budget,
    }


def llava_config_of(config: TwigVLMConfig) -> LlavaConfig:
    """The plain LLaVA config of a TwigVLM's base (for the self-check's reference and for exporting the base)."""
    return LlavaConfig(**llava_fields(config))
