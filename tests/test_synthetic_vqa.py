"""The synthetic visual-question task: deterministic, answers true to the picture, test combinations unseen."""

import json

import numpy as np
import pytest

from twigvlm.synthetic_vqa.data import scene_record, write_split
from twigvlm.synthetic_vqa.questions import FAMILIES, NUMBER_WORDS, is_correct
from twigvlm.synthetic_vqa.scenes import (
    COLORS,
    GRID,
    HELD_OUT_PAIRS,
    SHAPES,
    picture_draws,
    render,
    sample_scene,
)
from twigvlm.synthetic_vqa.tokenizer import build_task_processor


IMAGE_SIZE = 96


def test_same_seed_gives_the_same_data(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        write_split(folder, seed=3, split="train", num_scenes=6, image_size=IMAGE_SIZE)
    assert (first / "train.json").read_text() == (second / "train.json").read_text()
    for index in range(6):
        assert (first / f"train/{index:06d}.png").read_bytes() == (second / f"train/{index:06d}.png").read_bytes()
    other = scene_record(4, "train", 0, IMAGE_SIZE)[0]
    assert any(scene_record(3, "train", i, IMAGE_SIZE)[0] != other for i in range(3))


def objects_seen_in_picture(scene, image) -> dict[int, str]:
    """Reads the picture back: each cell's object colour, from the pixel at the object's centre (nearest colour)."""
    pixels = np.asarray(image).astype(float)
    seen = {}
    for obj, (x, y) in zip(scene.objects, picture_draws(scene, IMAGE_SIZE)[1]):
        pixel = pixels[int(y), int(x)]
        seen[obj.cell] = min(COLORS, key=lambda name: np.abs(pixel - COLORS[name]).sum())
    return seen


def independent_answer(scene, question: str) -> str | None:
    """A second reading of the question families whose answer is a count or yes/no, written without the generator."""
    words = question.rstrip("?").split()
    if question == "how many objects are there?":
        return NUMBER_WORDS[len(scene.objects)]
    if words[:2] == ["how", "many"] and words[2] in COLORS:
        return NUMBER_WORDS[sum(obj.color == words[2] for obj in scene.objects)]
    if words[:2] == ["how", "many"]:
        singular = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}[words[2]]
        return NUMBER_WORDS[sum(obj.shape == singular for obj in scene.objects)]
    if words[:2] == ["is", "there"]:
        return "yes" if any(obj.color == words[3] and obj.shape == words[4] for obj in scene.objects) else "no"
    return None


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_answer_is_true_of_its_picture(split):
    checked = 0
    for index in range(60):
        scene = sample_scene(0, split, index)
        image = render(scene, IMAGE_SIZE)
        # The picture shows exactly the described objects: the right colour at each centre, nothing in empty cells.
        assert objects_seen_in_picture(scene, image) == {obj.cell: obj.color for obj in scene.objects}
        pixels = np.asarray(image).astype(float)
        cell = IMAGE_SIZE // GRID
        occupied = {obj.cell for obj in scene.objects}
        for empty in set(range(GRID * GRID)) - occupied:
            row, column = divmod(empty, GRID)
            patch = pixels[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell]
            saturation = patch.max(-1) - patch.min(-1)
            assert saturation.max() < 110, f"scene {index}: an object colour in empty cell {empty}"
        _, questions = scene_record(0, split, index, IMAGE_SIZE)
        assert [question.family for question in questions][-1] == "describe"
        assert sorted(question.family for question in questions) == sorted(FAMILIES)
        for question in questions:
            expected = independent_answer(scene, question.question)
            if expected is not None:
                assert question.answer == expected, question
                checked += 1
            if question.family == "describe":
                described = [sentence.split(" at the ")[0].split() for sentence in question.answer.split(". ")[1:]]
                assert [words[-3:] for words in described] == [[o.size, o.color, o.shape] for o in scene.objects]
            if question.family == "spatial" and question.answer != "nothing":
                color, shape = question.answer.split()
                assert any(obj.color == color and obj.shape == shape for obj in scene.objects)
    assert checked > 100


def test_test_split_holds_only_unseen_combinations():
    train_pairs = set()
    for index in range(400):
        train_pairs |= sample_scene(0, "train", index).pairs
        train_pairs |= sample_scene(0, "validation", index).pairs
    assert not train_pairs & HELD_OUT_PAIRS
    assert len(train_pairs) == len(COLORS) * len(SHAPES) - len(HELD_OUT_PAIRS)
    for index in range(200):
        assert sample_scene(0, "test", index).pairs & HELD_OUT_PAIRS


def test_checker_and_tokenizer():
    assert is_correct("Red.", "red") and is_correct(" two ", "two") and not is_correct("red circle", "red")
    processor = build_task_processor(IMAGE_SIZE, 8)
    tokenizer = processor.tokenizer
    for index in range(30):
        record, _ = scene_record(0, "test", index, IMAGE_SIZE)
        for turn in record["conversations"]:
            assert tokenizer.unk_token_id not in tokenizer(turn["value"])["input_ids"], turn["value"]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]}],
        add_generation_prompt=True,
    )
    assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"]
    assert json.loads(json.dumps(record))


def test_recipe_runs_end_to_end_on_the_tiny_recipe(tmp_path):
    """Data, base training, twig training, the float16 checkpoint and both tables, at a size that takes seconds."""
    from twigvlm.synthetic_vqa.recipe import main
    from twigvlm.synthetic_vqa.tables import METHODS, PAPER_BUDGETS

    main(["--recipe", "tiny", "--output", str(tmp_path), "--eval-per-family", "2", "--speed-prompts", "1"])
    tables = json.loads((tmp_path / "tables.json").read_text())
    rows = tables["accuracy"]["rows"]
    assert [(row["method"], row["paper_budget"]) for row in rows] == [("none", None)] + [
        (method, budget) for budget in PAPER_BUDGETS for method in METHODS
    ]
    for row in rows:
        assert set(FAMILIES) | {"all"} <= set(row) and 0 <= row["all"] <= 100
    # Vision-side methods keep exactly the share of the 36 image tokens; in-LLM ones average to about it.
    pooled = {row["paper_budget"]: row["visual_tokens"] for row in rows if row["method"] == "pooling"}
    assert pooled == {192: 12.0, 128: 8.0, 64: 4.0}
    speculative = {row["configuration"]: row for row in tables["speculative"]["rows"]}
    assert set(speculative) == {"LLaVA (transformers)", "TwigVLM, no pruning", "SSD alone"} | {
        f"TTP {budget}{ssd}" for budget in PAPER_BUDGETS for ssd in ("", " + SSD")
    }
    # Greedy decoding: no pruning equals LLaVA, and SSD changes no answer.
    assert all(row["answers_equal"] == 1 for row in speculative.values() if row["greedy_equal_to"] is not None)
    assert speculative["SSD alone"]["acceptance_rate"] is not None
    assert 0 <= tables["fixed_subset_accuracy"] <= 100
    assert set(tables["short_question_accuracy_by_split"]) == {"train", "validation", "test"}
    assert set(tables["stage_seconds"]) == {"data", "base", "base_continued", "twig", "checkpoint"}
    assert "## Accuracy under token reduction" in (tmp_path / "tables.md").read_text()
