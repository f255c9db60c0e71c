"""
The small TwigVLM trained in this repository on the synthetic visual-question task (`python -m twigvlm.synthetic_vqa`),
shipped as float16 weights, config and processor files: the default model of the `twigvlm` program and the demo.
"""

import shutil
from pathlib import Path

import torch

from twigvlm import TwigVLMForConditionalGeneration

from .sample import ASSETS_DIR


BUNDLED_MODEL_DIR = ASSETS_DIR / "model"
# What the processor needs; the modelling code is not kept twice in the repository but written by `save_pretrained`.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def save_bundled_model(folder: str | Path) -> Path:
    """Writes the bundled model as a Hub-style folder (weights, config, remote code, processor) and returns it."""
    folder = Path(folder)
    model = TwigVLMForConditionalGeneration.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float16)
    model.save_pretrained(folder)
    for name in PROCESSOR_FILES:
        shutil.copy2(BUNDLED_MODEL_DIR / name, folder / name)
    return folder


def ship(checkpoint: str | Path) -> None:
    """Copies a trained checkpoint into the package as the bundled model, without its copies of the modelling code."""
    checkpoint = Path(checkpoint)
    staging = BUNDLED_MODEL_DIR.with_name("model.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", *PROCESSOR_FILES):
        shutil.copy2(checkpoint / name, staging / name)
    shutil.rmtree(BUNDLED_MODEL_DIR, ignore_errors=True)
    staging.rename(BUNDLED_MODEL_DIR)
