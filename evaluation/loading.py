"""Loading a TwigVLM checkpoint with this package's own classes, for evaluation and the demo."""

import torch
from transformers import AutoConfig, AutoProcessor

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def load_twigvlm(
    pretrained: str,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    device_map: str | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> tuple[TwigVLMForConditionalGeneration, object]:
    """
    The model and processor of a checkpoint, run by the installed package rather than the checkpoint's copy of the
    code, so that the statistics read from the cache are the ones this package writes. With the config class
    registered, the processor's tokenizer reads config.json without asking to trust remote code.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose auto, {', '.join(DTYPES)}.")
    AutoConfig.register(TwigVLMConfig.model_type, TwigVLMConfig, exist_ok=True)
    model = TwigVLMForConditionalGeneration.from_pretrained(
        pretrained,
        revision=revision,
        dtype=DTYPES.get(dtype, "auto"),
        attn_implementation=attn_implementation,
        device_map=device_map,
    ).eval()
    if device_map is None:
        model.to(device)
    processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
    return model, processor
