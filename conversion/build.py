"""Writing a TwigVLM folder from checked inputs: weights, config and remote code, generation config, processor, card."""

from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration
from twigvlm.generation_twigvlm import speculative_generation_defaults

from .card import CardFacts, write_model_card
from .inputs import ConversionInputs
from .self_check import SelfCheckReport, run_self_check
from .writer import staged_folder, write_safetensors


class SelfCheckFailed(RuntimeError):
    """The written folder does not reproduce its inputs within the dtype's tolerance; nothing was kept."""


def added_token_ids(config: TwigVLMConfig) -> list[int]:
    """The ids LLaVA added after the original vocabulary (`<image>` first, then padding rows or llava-hf's `<pad>`)."""
    return list(range(config.image_token_index, config.text_config.vocab_size))


def twigvlm_generation_config(config: TwigVLMConfig, token_ids: dict) -> GenerationConfig:
    """
    The model's speculative-decoding defaults, and the added tokens suppressed: generation can never produce them,
    so the tokens generated on the original vocabulary are those of the original model.
    """
    return GenerationConfig(
        **token_ids, suppress_tokens=added_token_ids(config), **speculative_generation_defaults(config)
    )


def write_twigvlm(
    inputs: ConversionInputs,
    output: Path,
    dtype: torch.dtype,
    max_shard_size: int | str,
    overwrite: bool,
    self_check_device: str | None,
    repo_id: str,
    license: str,
    command: str,
) -> SelfCheckReport | None:
    """
    Write the folder beside `output` and move it into place only when complete and, unless `self_check_device` is
    None, when the self-check passed. `repo_id`, `license` and `command` are for the model card. Returns the
    self-check's figures.
    """
    config = TwigVLMConfig.from_dict(inputs.config.to_dict())
    config.dtype = dtype
    config.architectures = [TwigVLMForConditionalGeneration.__name__]
    generation_config = twigvlm_generation_config(config, inputs.token_ids)
    with staged_folder(output, overwrite) as folder:
        write_safetensors(folder, inputs.tensors, dtype, max_shard_size)
        config.save_pretrained(folder)
        custom_object_save(TwigVLMForConditionalGeneration, folder)
        generation_config.save_pretrained(folder)
        inputs.processor.save_pretrained(folder)
        report = None
        if self_check_device is not None:
            report = run_self_check(folder, config, inputs.tensors, inputs.processor, dtype, self_check_device)
            if not report.passed:
                raise SelfCheckFailed(f"Self-check failed, nothing was written: {report.summary()}")
        card = CardFacts(
            repo_id=repo_id,
            base_model=inputs.base_model,
            base_description=inputs.base_description,
            license=license,
            sources=[source.describe() for source in inputs.sources],
            command=command,
            dtype=str(dtype).removeprefix("torch."),
            self_check=report.summary() if report else "skipped (--skip-self-check).",
            grown_twig=inputs.grown_twig,
            image_token_added=inputs.image_token_added,
        )
        write_model_card(folder, config, generation_config, card)
    return report
