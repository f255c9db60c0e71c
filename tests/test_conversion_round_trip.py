"""Going back: the base alone is a plain LLaVA checkpoint; the twig alone, converted again, gives identical tensors."""

import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conversion_checkpoints import ORIGINAL_VOCAB, TWIG_OPTIONS, raw_tensors, write_original
from twigvlm.conversion.cli import main
from twigvlm.conversion.self_check import probe_inputs
from test_conversion import load, read_tensors


def run(*args) -> None:
    main([str(arg) for arg in args])


def test_export_base_and_twig_then_convert_again(tmp_path):
    raw = raw_tensors()
    llava, clip, twig = write_original(raw, tmp_path / "released")
    run("build", "--llava", llava, "--vision-tower", clip, "--twig", twig, "--output", tmp_path / "twigvlm", *TWIG_OPTIONS,
        "--skip-self-check")
    run("export-base", "--twigvlm", tmp_path / "twigvlm", "--output", tmp_path / "base")
    run("export-twig", "--twigvlm", tmp_path / "twigvlm", "--output", tmp_path / "twig")

    # The base loads in transformers' own LLaVA, no remote code, every tensor used, and scores as TwigVLM's base.
    llava_hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not any(info.values()), info
    inputs = probe_inputs(AutoProcessor.from_pretrained(tmp_path / "base"))
    with torch.no_grad():
        expected = load(tmp_path / "twigvlm")(**inputs, token_reduction="none").logits
        assert torch.equal(llava_hf.eval()(**inputs).logits, expected)

    # The twig is in the authors' layout, over the original vocabulary, with the released values.
    with safe_open(tmp_path / "twig" / "model.safetensors", "pt") as handle:
        exported = {name: handle.get_tensor(name) for name in handle.keys()}
    assert exported.keys() == raw.twig.keys()
    assert exported["lm_head.weight"].shape[0] == ORIGINAL_VOCAB
    for name, tensor in raw.twig.items():
        assert torch.equal(exported[name], tensor.float()), name

    run("build", "--llava", tmp_path / "base", "--twig", tmp_path / "twig", "--output", tmp_path / "again", *TWIG_OPTIONS,
        "--skip-self-check")
    first, again = read_tensors(tmp_path / "twigvlm"), read_tensors(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
