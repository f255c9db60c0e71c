"""Converting the released layouts: the converted folder generates and scores as our model and LLaVA built directly from the same tensors."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion_checkpoints import (
    LLAVA_HF_NAMES,
    ORIGINAL_VOCAB,
    TWIG_OPTIONS,
    VOCAB,
    raw_tensors,
    reference_llava,
    reference_twigvlm,
    write_llava_hf,
    write_original,
)
from twigvlm.conversion.cli import main
from twigvlm.conversion.self_check import probe_inputs


ADDED_TOKENS = list(range(ORIGINAL_VOCAB, VOCAB))


def convert(*args) -> None:
    main(["build", *map(str, args), *TWIG_OPTIONS])


@pytest.fixture(scope="module")
def raw():
    return raw_tensors()


@pytest.fixture(scope="module")
def original(raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    llava, clip, twig = write_original(raw, root)
    convert("--llava", llava, "--vision-tower", clip, "--twig", twig, "--output", root / "twigvlm", "--max-shard-size", "200KB")
    return root / "twigvlm"


def load(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()


def probe(folder):
    return probe_inputs(AutoProcessor.from_pretrained(folder))


def read_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)


@pytest.mark.parametrize("token_reduction", ["twig", "none"])
@pytest.mark.parametrize("speculative_decoding", [True, False])
def test_original_generates_as_our_model_built_from_the_same_tensors(raw, original, token_reduction, speculative_decoding):
    converted, reference = load(original), reference_twigvlm(raw)
    inputs = probe(original)
    options = dict(token_reduction=token_reduction, speculative_decoding=speculative_decoding)
    ours = generate(converted, inputs, **options)
    # The reference's rows for the added tokens are random: with them suppressed they cannot matter.
    assert torch.equal(ours, generate(reference, inputs, suppress_tokens=ADDED_TOKENS, **options))
    assert ours.shape[1] == inputs["input_ids"].shape[1] + 6


def test_original_base_logits_equal_transformers_llava_and_twig_logits_the_reference(raw, original):
    converted, llava, reference = load(original), reference_llava(raw), reference_twigvlm(raw)
    inputs = probe(original)
    with torch.no_grad():
        ours = converted(**inputs, token_reduction="none").logits[..., :ORIGINAL_VOCAB]
        theirs = llava(**inputs).logits[..., :ORIGINAL_VOCAB]
        twig = converted.twig_forward(**inputs).logits[..., :ORIGINAL_VOCAB]
        reference_twig = reference.twig_forward(**inputs).logits[..., :ORIGINAL_VOCAB]
    assert (ours - theirs).abs().max() <= 1e-5
    assert (twig - reference_twig).abs().max() <= 1e-5


def test_original_folder_layout(original):
    files = {path.name for path in original.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md", "modeling_twigvlm.py",
            "configuration_twigvlm.py", "processor_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert len([name for name in files if name.endswith(".safetensors")]) > 1  # sharded at 200KB
    config = json.loads((original / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_twigvlm.TwigVLMForConditionalGeneration"
    assert (config["twig_attach_layer"], config["num_twig_layers"], config["final_wipe_layer"]) == (2, 2, 5)
    assert config["image_token_index"] == ORIGINAL_VOCAB and config["text_config"]["vocab_size"] == VOCAB
    generation = json.loads((original / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == ADDED_TOKENS
    assert generation["num_assistant_tokens"] == 5 and generation["assistant_confidence_threshold"] == 0.6
    assert generation["num_assistant_tokens_schedule"] == "constant" and generation["assistant_early_exit"] == 2
    processor = AutoProcessor.from_pretrained(original)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == ORIGINAL_VOCAB
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True).endswith("ASSISTANT:")


def test_model_card(original):
    card = ModelCard.load(original / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "llama2" and "twigvlm" in card.data.tags
    for expected in ("trust_remote_code=True", "visual_token_budget", "speculative_decoding", ">=5.17,<6",
                     "Self-check: probe of", "twigvlm-convert build --llava", "Improved Baselines", "Growing a Twig"):
        assert expected in card.text, expected


def tampered(folder):
    """The converted model with the added tokens' output rows made to win: a multiple of the first generated token's row."""
    model = load(folder)
    first = int(generate(model, probe(folder), token_reduction="none", speculative_decoding=False)[0, -6])
    with torch.no_grad():
        for head in (model.lm_head, model.model.twig.lm_head):
            head.weight[ORIGINAL_VOCAB:] = 10 * head.weight[first]
    return model


def test_added_tokens_are_never_generated(original):
    """Output on the original vocabulary is unchanged whatever the added rows hold, greedy, speculative or sampled."""
    inputs = probe(original)
    plain = generate(load(original), inputs, token_reduction="none", speculative_decoding=False)
    model = tampered(original)
    for speculative_decoding in (False, True):
        assert torch.equal(generate(model, inputs, token_reduction="none", speculative_decoding=speculative_decoding), plain)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=20, do_sample=True, speculative_decoding=False)
    assert (sampled[0, inputs["input_ids"].shape[1]:] < ORIGINAL_VOCAB).all()
    # The test can tell: without the suppression from generation_config.json the tampered rows would win.
    model.generation_config.suppress_tokens = None
    unsuppressed = generate(model, inputs, token_reduction="none", speculative_decoding=False)
    assert int(unsuppressed[0, -6]) >= ORIGINAL_VOCAB


@pytest.mark.parametrize("names", LLAVA_HF_NAMES)
def test_llava_hf_with_twig(raw, original, tmp_path, names):
    llava_hf = write_llava_hf(raw, tmp_path / "llava-hf", names)
    convert("--llava", llava_hf, "--twig", write_original(raw, tmp_path / "released")[2], "--output", tmp_path / "twigvlm")
    converted = read_tensors(tmp_path / "twigvlm")
    from_original = read_tensors(original)
    assert converted.keys() == from_original.keys()
    for name, tensor in converted.items():  # the same model; only the added rows differ (llava-hf brings its own)
        rows = ORIGINAL_VOCAB if tensor.shape[0] == VOCAB else tensor.shape[0]
        assert torch.equal(tensor[:rows], from_original[name][:rows]), name
    inputs = probe(tmp_path / "twigvlm")
    reference = reference_twigvlm(raw)
    assert torch.equal(generate(load(tmp_path / "twigvlm"), inputs), generate(reference, inputs, suppress_tokens=ADDED_TOKENS))
    assert json.loads((tmp_path / "twigvlm" / "generation_config.json").read_text())["suppress_tokens"] == ADDED_TOKENS


def test_grow_copies_base_layers(raw, tmp_path):
    llava, clip, _ = write_original(raw, tmp_path / "released")
    convert("--llava", llava, "--vision-tower", clip, "--grow", "--num-twig-layers", "3", "--output", tmp_path / "grown",
            "--skip-self-check")
    tensors = read_tensors(tmp_path / "grown")
    for i in range(3):
        assert torch.equal(tensors[f"model.twig.layers.{i}.mlp.up_proj.weight"], tensors[f"model.language_model.layers.{2 + i}.mlp.up_proj.weight"])
    assert torch.equal(tensors["model.twig.norm.weight"], tensors["model.language_model.norm.weight"])
    assert torch.equal(tensors["model.twig.lm_head.weight"], tensors["lm_head.weight"])
    assert "not trained" in (tmp_path / "grown" / "README.md").read_text()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_conversion_passes_its_self_check(raw, tmp_path, dtype, capsys):
    llava, clip, twig = write_original(raw, tmp_path / "released")
    convert("--llava", llava, "--vision-tower", clip, "--twig", twig, "--output", tmp_path / dtype, "--dtype", dtype)
    assert f"Self-check passed: probe of" in capsys.readouterr().out
    assert {tensor.dtype for tensor in read_tensors(tmp_path / dtype).values()} == {getattr(torch, dtype)}
    assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == dtype
