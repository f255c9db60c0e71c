"""Evaluation with lmms-eval: the `twigvlm` model plugin and our task YAMLs (`TASKS_DIR`, for `--include_path`)."""

from pathlib import Path


TASKS_DIR = Path(__file__).parent / "tasks"

__all__ = ["TASKS_DIR"]
