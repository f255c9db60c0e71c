"""The task's splits on disk: PNG pictures and LLaVA conversation records (the format `twigvlm-train` reads)."""

import json
import os
from dataclasses import asdict
from pathlib import Path

from .questions import Question, scene_questions
from .scenes import render, sample_scene, scene_rng


def scene_record(
    seed: int, split: str, index: int, image_size: int, describe_last: bool = True
) -> tuple[dict, list[Question]]:
    """The scene's conversation record (every question, one turn each) and its questions."""
    scene = sample_scene(seed, split, index)
    rng = scene_rng(seed, split, index)
    rng.random()  # the question draws follow the scene's own
    questions = scene_questions(scene, split, rng, describe_last)
    turns = []
    for i, question in enumerate(questions):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question.question})
        turns.append({"from": "gpt", "value": question.answer})
    record = {"id": f"{split}-{index}", "image": f"{split}/{index:06d}.png", "conversations": turns}
    return record, questions


def write_split(
    folder: str | os.PathLike,
    seed: int,
    split: str,
    num_scenes: int,
    image_size: int,
    first_scene: int = 0,
    name: str | None = None,
    describe_last: bool = True,
) -> Path:
    """
    Writes scenes `first_scene`.. of `split` as `folder/{split}/*.png`, `folder/{name}.json` (multi-turn LLaVA records,
    for training; `name` defaults to the split's) and `folder/{name}_questions.json` (one question per item with its
    family and image, for evaluation).
    """
    folder, name = Path(folder), name or split
    (folder / split).mkdir(parents=True, exist_ok=True)
    records, items = [], []
    for index in range(first_scene, first_scene + num_scenes):
        record, questions = scene_record(seed, split, index, image_size, describe_last)
        render(sample_scene(seed, split, index), image_size).save(folder / record["image"])
        records.append(record)
        items += [{"image": record["image"], **asdict(question)} for question in questions]
    (folder / f"{name}.json").write_text(json.dumps(records))
    (folder / f"{name}_questions.json").write_text(json.dumps(items))
    return folder / f"{name}.json"
