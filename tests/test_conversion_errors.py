"""Bad inputs stop the conversion with a message naming what is wrong, and leave no output folder behind."""

import pytest
import torch
from safetensors.torch import save_file
from transformers.utils import is_protobuf_available, is_sentencepiece_available

from conversion_checkpoints import TWIG_OPTIONS, raw_tensors, write_original
from twigvlm.conversion import build
from twigvlm.conversion.cli import build_parser, main


@pytest.fixture
def released(tmp_path):
    return write_original(raw_tensors(), tmp_path / "released")


def convert_fails(tmp_path, capsys, llava, clip, twig, *extra) -> str:
    output = tmp_path / "out"
    args = ["build", "--llava", llava, "--vision-tower", clip, "--twig", twig, "--output", output, *TWIG_OPTIONS, *extra]
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    assert exit_info.value.code == 1
    assert not output.exists()
    assert not any(path.name.startswith("tmp-") for path in tmp_path.iterdir())  # no staging folder left either
    return capsys.readouterr().err


def test_missing_shard(tmp_path, capsys, released):
    (released[0] / "pytorch_model-00002-of-00002.bin").unlink()
    error = convert_fails(tmp_path, capsys, *released)
    assert "pytorch_model-00002-of-00002.bin" in error and "missing" in error


def test_truncated_safetensors(tmp_path, capsys, released):
    path = released[2] / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    error = convert_fails(tmp_path, capsys, *released)
    assert str(path) in error and "truncated or corrupt" in error


def test_unknown_extra_tensor(tmp_path, capsys, released):
    llava, clip, twig = released
    tensors = raw_tensors().twig | {"model.twig_router.weight": torch.zeros(2, 2)}
    save_file(tensors, twig / "model.safetensors")
    error = convert_fails(tmp_path, capsys, llava, clip, twig)
    assert "model.twig_router.weight" in error and "twig checkpoint" in error


def test_twig_of_another_hidden_size(tmp_path, capsys, released):
    llava, clip, twig = released
    save_file(raw_tensors(hidden_size=96).twig, twig / "model.safetensors")
    error = convert_fails(tmp_path, capsys, llava, clip, twig)
    assert "Shape mismatch" in error and "(100, 96)" in error and "(128, 64)" in error


def test_existing_output_needs_overwrite(tmp_path, capsys, released):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    args = ["build", "--llava", *released[:1], "--vision-tower", released[1], "--twig", released[2], "--output", output]
    with pytest.raises(SystemExit):
        main([str(arg) for arg in [*args, *TWIG_OPTIONS, "--skip-self-check"]])
    assert "--overwrite" in capsys.readouterr().err and (output / "keep.txt").read_text() == "mine"
    main([str(arg) for arg in [*args, *TWIG_OPTIONS, "--skip-self-check", "--overwrite"]])
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert not any(path.name.startswith("tmp-") for path in tmp_path.iterdir())


def test_self_check_refuses_a_wrong_tensor(tmp_path, capsys, released, monkeypatch):
    """A writer that changes one twig tensor: the self-check sees the twig's logits move and nothing is kept."""
    write = build.write_safetensors

    class Perturbed:
        def __init__(self, source):
            self.source, self.shape = source, source.shape

        def load(self):
            return self.source.load() * 1.5

    def faulty_write(folder, tensors, dtype, max_shard_size):
        name = "model.twig.layers.0.mlp.down_proj.weight"
        return write(folder, {**tensors, name: Perturbed(tensors[name])}, dtype, max_shard_size)

    monkeypatch.setattr(build, "write_safetensors", faulty_write)
    error = convert_fails(tmp_path, capsys, *released)
    assert "Self-check failed" in error and "twig logits max |difference|" in error


def test_help_explains_every_option():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help and len(action.help) > 15, (name, action.dest)


@pytest.mark.skipif(is_sentencepiece_available() and is_protobuf_available(), reason="sentencepiece is installed")
def test_sentencepiece_only_tokenizer_says_what_to_install(tmp_path, capsys, released):
    llava = released[0]
    (llava / "tokenizer.json").unlink()
    (llava / "tokenizer.model").write_bytes(b"\x0a\x00")  # what the release ships: a sentencepiece model only
    error = convert_fails(tmp_path, capsys, *released)
    assert "pip install sentencepiece protobuf" in error and "--tokenizer" in error
