"""Lazy, read-only access to the tensors of a checkpoint folder (safetensors or PyTorch `.bin`, sharded or not)."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted as it is; the message names the file or tensor and what is wrong."""


class Checkpoint:
    """
    The tensors of one checkpoint folder, read one at a time.

    Safetensors files are opened lazily (only their headers are read until a tensor is asked for) and `.bin` files are
    memory-mapped, so a conversion streams tensors from disk and never holds a whole input model in memory.
    """

    def __init__(self, folder: str | Path, label: str):
        self.folder = Path(folder)
        self.label = label
        self._files: dict[Path, object] = {}
        self._tensor_files = self._index()

    def __repr__(self) -> str:
        return f"{self.label} checkpoint in {self.folder}"

    def _index(self) -> dict[str, Path]:
        """Tensor name -> file, from the shard index when there is one, else from the single weights file."""
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.folder / index_name
            if index_path.is_file():
                weight_map = json.loads(index_path.read_text())["weight_map"]
                files = {name: self.folder / file_name for name, file_name in weight_map.items()}
                for path in sorted(set(files.values())):
                    if not path.is_file():
                        raise CheckpointError(
                            f"{self.label}: shard {path.name} is listed in {index_path} but missing; download the "
                            "checkpoint again (every shard the index names is needed)."
                        )
                return files
        for file_name in SINGLE_FILES:
            path = self.folder / file_name
            if path.is_file():
                return {name: path for name in self._open(path).keys()}
        raise CheckpointError(
            f"{self.label}: {self.folder} holds no weights (looked for {', '.join(SINGLE_FILES)} or a shard index)."
        )

    def _open(self, path: Path):
        """The open handle of one weights file: a safetensors reader, or the memory-mapped `.bin` state dict."""
        if path not in self._files:
            try:
                if path.suffix == ".safetensors":
                    self._files[path] = safe_open(path, framework="pt")
                else:
                    self._files[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except (SafetensorError, RuntimeError, OSError) as error:
                raise CheckpointError(
                    f"{self.label}: cannot read {path} ({error}); the file is truncated or corrupt, download it again."
                ) from error
        return self._files[path]

    def names(self) -> list[str]:
        return sorted(self._tensor_files)

    def __contains__(self, name: str) -> bool:
        return name in self._tensor_files

    def _file_of(self, name: str) -> Path:
        if name not in self._tensor_files:
            raise CheckpointError(f"{self.label}: tensor {name} is missing from {self.folder}.")
        return self._tensor_files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        path = self._file_of(name)
        handle = self._open(path)
        if path.suffix == ".safetensors":
            return tuple(handle.get_slice(name).get_shape())
        return tuple(self._bin_tensor(handle, name, path).shape)

    def load(self, name: str) -> torch.Tensor:
        path = self._file_of(name)
        handle = self._open(path)
        if path.suffix == ".safetensors":
            try:
                return handle.get_tensor(name)
            except SafetensorError as error:
                raise CheckpointError(f"{self.label}: cannot read tensor {name} from {path} ({error}).") from error
        return self._bin_tensor(handle, name, path)

    def _bin_tensor(self, state_dict: dict, name: str, path: Path) -> torch.Tensor:
        if name not in state_dict:
            raise CheckpointError(f"{self.label}: the index puts tensor {name} in {path.name}, but that file lacks it.")
        return state_dict[name]
