"""Questions about a scene whose answers follow from the scene's description, and the exact-match checker."""

import random
import re
from dataclasses import dataclass

from .scenes import BACKGROUNDS, CELL_NAMES, COLORS, GRID, SHAPES, Scene, SceneObject, allowed_pairs


FAMILIES = ("attribute", "counting", "existence", "spatial", "describe")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Direction of each spatial relation as (row step, column step).
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


@dataclass(frozen=True)
class Question:
    family: str
    question: str
    answer: str


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def attribute_question(scene: Scene, rng: random.Random) -> Question:
    """The colour of the only object of a shape, the shape of the only object of a colour, or either at a position."""
    options = []
    for shape in SHAPES:
        matching = [obj for obj in scene.objects if obj.shape == shape]
        if len(matching) == 1:
            options.append((f"what color is the {shape}?", matching[0].color))
    for color in COLORS:
        matching = [obj for obj in scene.objects if obj.color == color]
        if len(matching) == 1:
            options.append((f"what shape is the {color} object?", matching[0].shape))
    obj = rng.choice(scene.objects)
    options.append((f"what color is the object at the {obj.position}?", obj.color))
    options.append((f"what shape is the object at the {obj.position}?", obj.shape))
    question, answer = rng.choice(options)
    return Question("attribute", question, answer)


def counting_question(scene: Scene, rng: random.Random) -> Question:
    kind = rng.choice(("objects", "color", "shape"))
    if kind == "objects":
        return Question("counting", "how many objects are there?", NUMBER_WORDS[len(scene.objects)])
    if kind == "color":
        color = rng.choice(list(COLORS))
        count = sum(obj.color == color for obj in scene.objects)
        return Question("counting", f"how many {color} objects are there?", NUMBER_WORDS[count])
    shape = rng.choice(SHAPES)
    count = sum(obj.shape == shape for obj in scene.objects)
    return Question("counting", f"how many {plural(shape)} are there?", NUMBER_WORDS[count])


def existence_question(scene: Scene, split: str, rng: random.Random) -> Question:
    """Yes for an object of the scene, no for a pair it lacks (POPE-like); half and half."""
    absent = [pair for pair in allowed_pairs(split) if pair not in scene.pairs]
    if rng.random() < 0.5 or not absent:
        obj = rng.choice(scene.objects)
        color, shape, answer = obj.color, obj.shape, "yes"
    else:
        (color, shape), answer = rng.choice(absent), "no"
    article = "an" if color[0] in "aeiou" else "a"
    return Question("existence", f"is there {article} {color} {shape}?", answer)


def neighbour(scene: Scene, reference: SceneObject, relation: str) -> SceneObject | None:
    """The nearest object in the relation's direction, in the same row or column; None when there is none."""
    row_step, column_step = RELATIONS[relation]
    by_cell = {obj.cell: obj for obj in scene.objects}
    row, column = reference.row + row_step, reference.column + column_step
    while 0 <= row < GRID and 0 <= column < GRID:
        if row * GRID + column in by_cell:
            return by_cell[row * GRID + column]
        row, column = row + row_step, column + column_step
    return None


def spatial_question(scene: Scene, rng: random.Random) -> Question:
    """What is next to an object named by its colour and shape (unique in the scene); 'nothing' when no object is."""
    unique = [obj for obj in scene.objects if sum(o.color == obj.color and o.shape == obj.shape for o in scene.objects) == 1]
    reference = rng.choice(unique or list(scene.objects))
    relation = rng.choice(list(RELATIONS))
    found = neighbour(scene, reference, relation)
    answer = "nothing" if found is None else f"{found.color} {found.shape}"
    return Question("spatial", f"what is {relation} the {reference.color} {reference.shape}?", answer)


def describe(scene: Scene) -> str:
    """Every object in reading order with its size, colour, shape and position."""
    count = len(scene.objects)
    sentences = [f"there are {NUMBER_WORDS[count]} objects on a {scene.background} background."]
    sentences += [f"a {obj.size} {obj.color} {obj.shape} at the {obj.position}." for obj in scene.objects]
    return " ".join(sentences)


def describe_question(scene: Scene) -> Question:
    return Question("describe", "describe the image.", describe(scene))


def scene_questions(scene: Scene, split: str, rng: random.Random, describe_last: bool = True) -> list[Question]:
    """One question of each family, the four short ones in random order, the description last or anywhere."""
    questions = [
        attribute_question(scene, rng),
        counting_question(scene, rng),
        existence_question(scene, split, rng),
        spatial_question(scene, rng),
    ]
    rng.shuffle(questions)
    questions.insert(len(questions) if describe_last else rng.randrange(len(questions) + 1), describe_question(scene))
    return questions


def normalize_answer(text: str) -> str:
    """Lower-case words only: punctuation, spacing and a trailing period do not count against an answer."""
    return " ".join(re.findall(r"[a-z]+", text.lower()))


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def task_words() -> list[str]:
    """Every word a question or answer of the task can hold, for the tokenizer."""
    words = ["what", "color", "shape", "is", "the", "object", "at", "how", "many", "objects", "are", "there", "a",
             "yes", "no", "nothing", "describe", "image", "on", "background", "of", "left", "right", "above", "below"]  # fmt: skip
    words += list(COLORS) + list(SHAPES) + [plural(shape) for shape in SHAPES] + ["small", "large"]
    words += list(NUMBER_WORDS) + [word for name in CELL_NAMES for word in name.split()]
    words += [word for name in BACKGROUNDS for word in name.split()]
    return list(dict.fromkeys(words))
