"""The small TwigVLM trained here and shipped in the package: its size, its accuracy, the program's default answer."""

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from twigvlm.app.bundled_model import BUNDLED_MODEL_DIR, save_bundled_model
from twigvlm.app.cli import main
from twigvlm.app.sample import SAMPLE_SCENE, default_question
from twigvlm.synthetic_vqa.data import scene_record, write_split
from twigvlm.synthetic_vqa.questions import is_correct
from twigvlm.synthetic_vqa.tables import answer_all, family_accuracy, load_items


README = Path(__file__).parents[1] / "README.md"
SUBSET_SCENES = 20  # the first scenes of the test split: one question of each family per scene


def recorded_subset_accuracy() -> float:
    words = " ".join(README.read_text().split())  # the sentence may wrap
    found = re.search(r"fixed test subset \(first 20 test scenes, 100 questions\): ([\d.]+) %", words)
    assert found, "the README records the bundled model's accuracy on the fixed test subset"
    return float(found.group(1))


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    folder = save_bundled_model(tmp_path_factory.mktemp("bundled") / "twigvlm-small")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def test_bundled_checkpoint_is_small_and_float16():
    weights = BUNDLED_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    with safe_open(weights, "pt") as file:
        assert {file.get_slice(name).get_dtype() for name in file.keys()} == {"F16"}
    assert not list(BUNDLED_MODEL_DIR.glob("*.py"))  # the code comes from the package, not a second copy


def test_accuracy_on_the_fixed_test_subset_matches_the_readme(bundled, tmp_path):
    model, processor = bundled
    image_size = model.config.vision_config.image_size
    write_split(tmp_path, seed=0, split="test", num_scenes=SUBSET_SCENES, image_size=image_size)
    items = load_items(tmp_path, "test", None)
    assert len(items) == 5 * SUBSET_SCENES
    processor.tokenizer.padding_side = "left"
    answers, _ = answer_all(model, processor, items, tmp_path, {}, batch_size=20)
    accuracy = family_accuracy(items, answers)["all"]
    assert abs(accuracy - recorded_subset_accuracy()) <= 2.0, accuracy


def test_default_run_answers_its_bundled_question(capsys):
    assert main(["--max-new-tokens", "100"]) == 0
    output = capsys.readouterr().out
    answer = re.search(r"^Answer: (.*)$", output, re.MULTILINE).group(1)
    _, questions = scene_record(*SAMPLE_SCENE, image_size=96)
    expected = [question.answer for question in questions if question.question == default_question()]
    assert expected, "the bundled question is one of the sample scene's questions"
    assert is_correct(answer, expected[0]), (answer, expected[0])
    assert "Self-speculative decoding:" in output
