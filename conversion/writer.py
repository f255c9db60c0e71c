"""Writing a checkpoint folder: all or nothing, and sharded safetensors streamed one shard at a time."""

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm


SAFETENSORS_INDEX = "model.safetensors.index.json"


class TensorSource(Protocol):
    """Anything that can produce one output tensor on demand and knows its shape beforehand."""

    shape: tuple[int, ...]

    def load(self) -> torch.Tensor: ...


@contextmanager
def staged_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """
    A temporary folder beside `output`, moved into place only when the block finishes; on any error it is deleted, so
    a failed conversion leaves nothing behind (and an existing `output` untouched).
    """
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"tmp-{output.name}-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            replaced = Path(tempfile.mkdtemp(prefix=f"tmp-replaced-{output.name}-", dir=output.parent))
            output.rename(replaced / output.name)
            staging.rename(output)
            shutil.rmtree(replaced)
        else:
            staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy in `dtype` (never a view of the input), refusing values the new dtype cannot hold."""
    converted = tensor.to(dtype=dtype, copy=True).contiguous()
    if converted.is_floating_point() and not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
        raise ValueError(
            f"{name} holds values beyond the range of {dtype} (largest magnitude {tensor.abs().max().item():.4g}); "
            "convert with another --dtype."
        )
    return converted


def write_safetensors(
    folder: Path, tensors: dict[str, TensorSource], dtype: torch.dtype, max_shard_size: int | str
) -> None:
    """
    Write `tensors` in `dtype` as `model.safetensors`, or as shards with `model.safetensors.index.json`. Tensors are
    loaded shard by shard, so memory holds one output shard at a time.
    """
    layout = {name: torch.empty(source.shape, dtype=dtype, device="meta") for name, source in tensors.items()}
    shards = split_torch_state_dict_into_shards(layout, max_shard_size=max_shard_size)
    with tqdm(total=len(tensors), desc="Writing weights", unit="tensor") as progress:
        for file_name, names in shards.filename_to_tensors.items():
            shard = {}
            for name in names:
                shard[name] = cast(name, tensors[name].load(), dtype)
                progress.update()
            save_file(shard, folder / file_name, metadata={"format": "pt"})
            del shard
    if shards.is_sharded:
        index = {"metadata": shards.metadata, "weight_map": shards.tensor_to_filename}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
