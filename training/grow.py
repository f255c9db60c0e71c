"""Grow a twig on a LLaVA model and load it for twig training."""

import contextlib
from collections.abc import Iterator

import torch
from transformers import PretrainedConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration
from twigvlm.conversion.layouts import grown_twig_source

from twigvlm.presets import load_preset


logger = logging.get_logger(__name__)

TWIG_PREFIX = "model.twig."
TWIG_FIELDS = ("twig_attach_layer", "num_twig_layers", "final_wipe_layer")
# llava-hf checkpoints written by transformers 4 keep LLaVA's old key layout; renamed to ours at load time. The
# patterns match nothing in the transformers-5 layout, so one mapping serves both.
LLAVA_HF_V4_KEY_MAPPING = {
    r"^language_model\.model": "model.language_model",
    r"^language_model\.lm_head": "lm_head",
    r"^vision_tower": "model.vision_tower",
    r"^multi_modal_projector": "model.multi_modal_projector",
}


@contextlib.contextmanager
def gathered_parameters(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """DeepSpeed ZeRO-3 shards parameters from load time on; whole tensors are needed to copy them."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0):
            yield
    else:
        yield


def grow_twig(model: TwigVLMForConditionalGeneration) -> None:
    """
    Initialise the twig as the paper does (twigvlm-method.md §1): its layers are copies of base layers K..K+T-1, its
    final norm and LM head copies of the base's, by the same mapping conversion grows a twig with. This start beats
    random or last-layer copies (paper Table 4c).
    """
    parameters = dict(model.named_parameters())
    pairs = [
        (parameter, parameters[grown_twig_source(name, model.config.twig_attach_layer)])
        for name, parameter in parameters.items()
        if name.startswith(TWIG_PREFIX)
    ]
    with gathered_parameters([parameter for pair in pairs for parameter in pair]), torch.no_grad():
        for twig_parameter, base_parameter in pairs:
            twig_parameter.copy_(base_parameter)


def twig_fields(
    preset: str | None = None,
    twig_attach_layer: int | None = None,
    num_twig_layers: int | None = None,
    final_wipe_layer: int | None = None,
) -> dict:
    """K, T and F: the explicit values, else the preset's, else TwigVLMConfig's defaults (LLaVA-1.5-7B's)."""
    fields = {name: value for name, value in load_preset(preset).items() if name in TWIG_FIELDS} if preset else {}
    explicit = dict(
        twig_attach_layer=twig_attach_layer, num_twig_layers=num_twig_layers, final_wipe_layer=final_wipe_layer
    )
    fields.update({name: value for name, value in explicit.items() if value is not None})
    return fields


def load_model_for_training(
    model_name_or_path: str,
    model_class: type[TwigVLMForConditionalGeneration] = TwigVLMForConditionalGeneration,
    grow: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
    twig_dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **fields,
) -> TwigVLMForConditionalGeneration:
    """
    A TwigVLM whose twig is ready to train, from a llava-hf checkpoint (either key layout; the twig is grown) or from
    a TwigVLM folder (its twig is kept unless `grow=True`). `fields` are K, T and F (see [`twig_fields`]).

    The frozen base stays in `dtype` (bf16 saves memory); the twig, the only trained part, is kept in `twig_dtype`
    (fp32 master weights under mixed precision). DeepSpeed casts both to its own precision.
    """
    config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path)
    model_type = config_dict.get("model_type")
    load_kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True)
    if model_type == "twigvlm":
        config = TwigVLMConfig.from_pretrained(model_name_or_path)
        mismatched = {name: value for name, value in fields.items() if getattr(config, name) != value}
        if mismatched:
            raise ValueError(
                f"{model_name_or_path} holds a twig with {', '.join(f'{n}={getattr(config, n)}' for n in mismatched)}"
                f", not {', '.join(f'{n}={v}' for n, v in mismatched.items())}; start from its base LLaVA checkpoint "
                "to grow a twig of another shape."
            )
        model, info = model_class.from_pretrained(model_name_or_path, **load_kwargs)
        check_loading_info(model_name_or_path, info, grown=False)
    elif model_type == "llava":
        llava_config = {key: value for key, value in config_dict.items() if key not in ("model_type", "architectures")}
        config = TwigVLMConfig(**{**llava_config, **fields})
        logger.info(
            f"Growing a twig (K={config.twig_attach_layer}, T={config.num_twig_layers}) on "
            f"{config.num_base_layers} base layers of {model_name_or_path}."
        )
        with logging_level(logging.ERROR):  # transformers warns that the twig is missing: it is grown below
            model, info = model_class.from_pretrained(
                model_name_or_path, config=config, key_mapping=LLAVA_HF_V4_KEY_MAPPING, **load_kwargs
            )
        check_loading_info(model_name_or_path, info, grown=True)
        grow = True
    else:
        raise ValueError(
            f"{model_name_or_path} is a {model_type!r} checkpoint; twig training starts from a llava-hf LLaVA "
            "checkpoint (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf) or a TwigVLM folder. Convert an original "
            "liuhaotian/llava-v1.5 checkpoint with the conversion command first."
        )
    if not is_deepspeed_zero3_enabled():
        model.model.twig.to(twig_dtype)
    if grow:
        grow_twig(model)
    return model


def check_loading_info(model_name_or_path: str, info: dict, grown: bool) -> None:
    """Every base tensor must come from the checkpoint; only a twig about to be grown may be missing."""
    missing = [key for key in info["missing_keys"] if not (grown and key.startswith(TWIG_PREFIX))]
    problems = {
        "missing": missing,
        "unexpected": list(info["unexpected_keys"]),
        "mismatched": [str(entry) for entry in info["mismatched_keys"]],
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        details = "; ".join(
            f"{kind}: {', '.join(sorted(keys)[:5])}{' ...' if len(keys) > 5 else ''}"
            for kind, keys in problems.items()
        )
        raise ValueError(f"{model_name_or_path} does not fit a TwigVLM of its config ({details}).")


@contextlib.contextmanager
def logging_level(level: int) -> Iterator[None]:
    previous = logging.get_verbosity()
    logging.set_verbosity(level)
    try:
        yield
    finally:
        logging.set_verbosity(previous)
