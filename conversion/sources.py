"""Conversion inputs given as local folders or Hub ids: resolved to a folder, with the revision recorded for the card."""

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.constants import HF_HUB_OFFLINE


# What a conversion reads from a repository; other formats (TF, Flax, ONNX) are never downloaded.
CONFIG_PATTERNS = ["*.json", "*.jinja", "tokenizer.model"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
BIN_PATTERNS = ["*.bin"]


@dataclass(frozen=True)
class Source:
    """One input: as the user named it, the local folder holding it, and the Hub commit it came from (if any)."""

    spec: str
    folder: Path
    commit: str | None = None

    def describe(self) -> str:
        return f"{self.spec} (commit {self.commit})" if self.commit else self.spec


def resolve_source(spec: str) -> Source:
    """
    A local folder as it is, otherwise a Hub id (`owner/name`, optionally `owner/name@revision`) downloaded through
    huggingface_hub's cache, safetensors weights only when the repository has them.
    """
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return Source(spec, folder.resolve())
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise FileNotFoundError(f"{spec} is neither a local folder nor a Hub id of the form owner/name[@revision].")
    weight_patterns = SAFETENSORS_PATTERNS + BIN_PATTERNS
    if not HF_HUB_OFFLINE:
        files = HfApi().list_repo_files(repo_id, revision=revision or None)
        if any(name.endswith(".safetensors") for name in files):
            weight_patterns = SAFETENSORS_PATTERNS
    snapshot = Path(
        snapshot_download(repo_id, revision=revision or None, allow_patterns=CONFIG_PATTERNS + weight_patterns)
    )
    return Source(spec, snapshot, commit=snapshot.name)
