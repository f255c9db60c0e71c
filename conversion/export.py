"""Going back from a TwigVLM folder: its base as a plain llava-hf checkpoint, its twig in the authors' release layout."""

import json
from pathlib import Path

from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration
from twigvlm.generation_twigvlm import speculative_generation_defaults

from .checkpoint import Checkpoint
from .configs import llava_config_of
from .layouts import TWIGVLM_BASE_LAYOUT, TWIGVLM_TWIG_LAYOUT
from .plan import check_complete, expected_shapes, plan_tensors
from .writer import staged_folder, write_safetensors


# The authors release their twig as one file.
SINGLE_FILE = "1000GB"


def export_base(folder: Path, output: Path, overwrite: bool, max_shard_size: int | str) -> None:
    """The base alone: loads in transformers' `LlavaForConditionalGeneration`, no remote code; same dtype."""
    config = TwigVLMConfig.from_pretrained(folder)
    checkpoint = Checkpoint(folder, "TwigVLM checkpoint")
    llava_config = llava_config_of(config)
    expected = expected_shapes(LlavaForConditionalGeneration, llava_config)
    plan = plan_tensors(expected, [(checkpoint, TWIGVLM_BASE_LAYOUT)])
    check_complete(plan, expected)
    dtype = checkpoint.load("lm_head.weight").dtype
    llava_config.dtype = dtype
    llava_config.architectures = [LlavaForConditionalGeneration.__name__]
    generation_config = GenerationConfig.from_dict(json.loads((folder / "generation_config.json").read_text()))
    defaults = GenerationConfig()
    for field in speculative_generation_defaults(config):  # a plain LLaVA does not draft with a twig
        setattr(generation_config, field, getattr(defaults, field))
    with staged_folder(output, overwrite) as staging:
        write_safetensors(staging, plan, dtype, max_shard_size)
        llava_config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        LlavaProcessor.from_pretrained(folder).save_pretrained(staging)


def export_twig(folder: Path, output: Path, overwrite: bool) -> None:
    """
    The twig alone as the authors release it: `model.safetensors` with `model.layers.{0..T-1}.*`, `model.norm.weight`
    and `lm_head.weight` over the original vocabulary (the rows LLaVA added are cut off). Converting it again with the
    same base gives back the same tensors.
    """
    config = TwigVLMConfig.from_pretrained(folder)
    checkpoint = Checkpoint(folder, "TwigVLM checkpoint")
    expected = {}
    for name, shape in expected_shapes(TwigVLMForConditionalGeneration, config).items():
        if name.startswith("model.twig."):
            expected[TWIGVLM_TWIG_LAYOUT.target_name(name)] = shape
    expected["lm_head.weight"] = (config.image_token_index, *expected["lm_head.weight"][1:])
    plan = plan_tensors(expected, [(checkpoint, TWIGVLM_TWIG_LAYOUT)])
    check_complete(plan, expected, vocab_rows="cut")
    dtype = checkpoint.load("model.twig.lm_head.weight").dtype
    with staged_folder(output, overwrite) as staging:
        write_safetensors(staging, plan, dtype, SINGLE_FILE)
