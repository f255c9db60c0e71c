"""The model-card template that conversion fills in for each converted checkpoint."""

from pathlib import Path


TEMPLATE = Path(__file__).resolve().parent / "README.md.jinja"
