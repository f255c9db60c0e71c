"""The `twigvlm` program run in-process: the bundled model's folder, a saved checkpoint, the options, bad input."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from small_random_model import build_small_twigvlm, save_small_twigvlm
from twigvlm.app.cli import main
from twigvlm.app.sample import SAMPLE_IMAGE_PATH, default_question, draw_sample_image


GROUP_LINE = re.compile(r"^\s+layers\s+(\d+)-(\d+)\s+(\d+)$", re.MULTILINE)


def run_program(capsys, *argv: str) -> tuple[str, str, list[tuple[int, int, int]]]:
    """The program's output, its answer and its per-group visual token counts as `(first, last, count)`."""
    assert main(list(argv)) == 0
    output = capsys.readouterr().out
    answers = re.findall(r"^Answer: (.*)$", output, re.MULTILINE)
    assert len(answers) == 1, output
    return output, answers[0], [tuple(int(number) for number in group) for group in GROUP_LINE.findall(output)]


@pytest.fixture(scope="module")
def saved_small_model(tmp_path_factory):
    """A small random-weight TwigVLM saved as a Hub-style folder (8 layers, 64 image tokens, budget 24)."""
    folder = tmp_path_factory.mktemp("small") / "twigvlm-small"
    save_small_twigvlm(folder)
    return folder


def test_default_runs_the_bundled_model_from_a_hub_style_folder(capsys, tmp_path):
    folder = tmp_path / "checkpoint"
    output, answer, groups = run_program(capsys, "--save-dir", str(folder), "--max-new-tokens", "6")

    assert "trained in this repository" in output
    assert f"Question: {default_question()}" in output
    assert answer
    # 144 image tokens; the default budget of 32 per layer keeps 30 for layers 1..8, FinalWipe drops all from layer 9.
    assert groups == [(0, 0, 144), (1, 8, 30), (9, 11, 0)]
    # What was run is a Hub-style folder with the remote code and the library processor.
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_twigvlm.TwigVLMForConditionalGeneration"
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "LlavaProcessor"
    assert (folder / "chat_template.jinja").is_file() and (folder / "modeling_twigvlm.py").is_file()


def test_model_option_runs_a_saved_checkpoint(capsys, saved_small_model):
    _, answer, groups = run_program(capsys, "--model", str(saved_small_model), "--max-new-tokens", "3")
    assert answer
    assert groups == [(0, 1, 64), (2, 5, 16), (6, 7, 0)]


@pytest.mark.parametrize(
    "options, kept",
    [
        (["--no-pruning"], [64, 64, 64]),
        (["--num-kept-visual-tokens", "41"], [64, 41, 0]),
        (["--visual-token-budget", "32"], [64, 32, 0]),  # R = ceil((8 * 32 - 2 * 64) / (6 - 2))
        (["--visual-token-budget", "64"], [64, 64, 0]),  # all 64 kept up to FinalWipe
    ],
)
def test_pruning_options(capsys, saved_small_model, options, kept):
    _, answer, groups = run_program(capsys, "--model", str(saved_small_model), "--max-new-tokens", "2", *options)
    assert answer
    assert groups == [(first, last, count) for (first, last), count in zip([(0, 1), (2, 5), (6, 7)], kept)]


@pytest.mark.parametrize(
    "options, groups, entering",
    [
        (["--token-reduction", "visionzip"], [(0, 7, 24)], 24),  # the checkpoint's budget of 24 enters the LLM
        (["--token-reduction", "fastv", "--num-kept-visual-tokens", "9"], [(0, 1, 64), (2, 7, 9)], 64),
        (["--token-reduction", "fastv", "--token-reduction-options", '{"layer": 3}', "--visual-token-budget", "40"],
         [(0, 2, 64), (3, 7, 26)], 64),  # R = round((8 * 40 - 3 * 64) / 5)
        (["--token-reduction", "pooling", "--visual-token-budget", "16"], [(0, 7, 16)], 16),
    ],
)
def test_token_reduction_options(capsys, saved_small_model, options, groups, entering):
    output, answer, found = run_program(capsys, "--model", str(saved_small_model), "--max-new-tokens", "2", *options)
    assert answer and found == groups
    assert f"Token reduction: {options[1]}" in output
    assert f"{entering} visual tokens entered the language model" in output
    assert "Self-speculative decoding: off" in output  # the baselines decode without drafting


def test_runtime_options(capsys, saved_small_model, tmp_path):
    image_path = tmp_path / "tall.png"
    Image.new("RGB", (30, 90), (10, 200, 30)).save(image_path)
    argv = ["--model", str(saved_small_model), "--max-new-tokens", "2", "--image", str(image_path)]
    argv += ["--question", "What colour is it?", "--dtype", "bfloat16", "--device", "cpu"]
    argv += ["--attn-implementation", "eager"]
    output, answer, _ = run_program(capsys, *argv)
    assert answer
    assert "(torch.bfloat16, cpu)" in output
    assert "Question: What colour is it?" in output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no-pruning", "--visual-token-budget", "64"], "not allowed with argument"),
        (["--visual-token-budget", "-1"], "-1 is below 0"),
        (["--num-kept-visual-tokens", "many"], "'many' is not an integer"),
        (["--max-new-tokens", "0"], "0 is below 1"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--attn-implementation", "flash"], "invalid choice: 'flash'"),
        (["--image", "no/such/picture.png"], "no such file"),
        (["--image", __file__], "not an image file"),
        (["--model", "./no/such/checkpoint"], "no such folder"),
        (["--model", "some-repo", "--save-dir", "out"], "--save-dir applies to the built-in small model only"),
        (["--token-reduction", "fastest"], "invalid choice: 'fastest'"),
        (["--no-pruning", "--token-reduction", "fastv"], "cannot go with --token-reduction fastv"),
        (["--token-reduction-options", '{"layer": 3}'], "needs --token-reduction METHOD"),
        (["--token-reduction", "fastv", "--token-reduction-options", "[3]"], "is not a JSON object"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "twigvlm: error:" in error and message in error, error


def test_a_budget_the_model_cannot_meet_is_a_clear_error(capsys, saved_small_model):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_small_model), "--visual-token-budget", "10"])
    assert exit_info.value.code == 2
    assert "twigvlm: error: visual_token_budget=10.0 is below 16" in capsys.readouterr().err


def test_an_unknown_method_option_is_a_clear_error(capsys, saved_small_model):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_small_model), "--token-reduction", "fastv", "--token-reduction-options", '{"rank": 3}'])
    assert exit_info.value.code == 2
    assert "got unknown option(s) 'rank'; valid options: layer" in capsys.readouterr().err


def test_sample_image_is_the_drawing():
    """The bundled PNG is what `draw_sample_image` draws, so it can be remade from the code."""
    with Image.open(SAMPLE_IMAGE_PATH) as bundled:
        assert np.array_equal(np.asarray(bundled.convert("RGB")), np.asarray(draw_sample_image()))


def test_small_model_is_deterministic_from_its_seed():
    first, second, other = (build_small_twigvlm(seed)[0].state_dict() for seed in (0, 0, 1))
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_speculative_decoding_statistics_and_switch(capsys, saved_small_model):
    argv = ["--model", str(saved_small_model), "--max-new-tokens", "8"]
    output, speculative_answer, _ = run_program(capsys, *argv)
    stats = re.search(r"^Self-speculative decoding: (\d+) rounds, (\d+) tokens drafted, (\d+) accepted", output, re.M)
    assert stats is not None, output
    rounds, drafted, accepted = map(int, stats.groups())
    assert rounds >= 1 and drafted >= accepted >= 0
    output, plain_answer, _ = run_program(capsys, *argv, "--no-speculative")
    assert "Self-speculative decoding: off" in output
    assert plain_answer == speculative_answer  # greedy answers do not depend on drafting
