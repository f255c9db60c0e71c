"""Presets of known base models (layer counts, twig placement, FinalWipe layer) read by conversion and training."""

import json
from pathlib import Path


PRESET_DIR = Path(__file__).parent


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """The preset called `name` (e.g. "llava-v1.5-7b"), as a dict."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown preset {name!r}; available presets: {', '.join(available_presets())}.")
    return json.loads(path.read_text())
