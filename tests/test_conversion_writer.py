"""The writer streams: each shard's tensors are loaded, written and released before the next shard's are loaded."""

import json

import pytest
import torch
from safetensors import safe_open

from twigvlm.conversion import writer


class Recorded:
    def __init__(self, name: str, events: list):
        self.name, self.events, self.shape = name, events, (256, 256)

    def load(self) -> torch.Tensor:
        self.events.append(("load", self.name))
        return torch.full(self.shape, float(len(self.events)))


def test_shards_are_written_one_at_a_time(tmp_path, monkeypatch):
    events = []
    save = writer.save_file

    def recorded_save(tensors, path, metadata):
        events.append(("save", path.name))
        save(tensors, path, metadata)

    monkeypatch.setattr(writer, "save_file", recorded_save)
    tensors = {f"layer.{i}.weight": Recorded(f"layer.{i}.weight", events) for i in range(6)}
    writer.write_safetensors(tmp_path, tensors, torch.float16, max_shard_size=300_000)  # two 128 KiB tensors a shard

    assert [kind for kind, _ in events] == ["load", "load", "save"] * 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors) and index["metadata"]["total_size"] == 6 * 256 * 256 * 2
    for name, file_name in index["weight_map"].items():
        with safe_open(tmp_path / file_name, "pt") as handle:
            assert handle.get_tensor(name).dtype == torch.float16


def test_staged_folder_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), writer.staged_folder(tmp_path / "out", overwrite=False) as staging:
        (staging / "half-written").write_text("x")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_cast_refuses_overflow():
    with pytest.raises(ValueError, match="big holds values beyond the range of torch.float16"):
        writer.cast("big", torch.tensor([1e6]), torch.float16)
