"""Scenes of coloured shapes on a 3×3 grid, drawn deterministically from a seed, and their pictures."""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


GRID = 3
# Cells in reading order (row by row, left to right) and the phrase naming each.
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (140, 55, 185),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Light backgrounds, so that every object colour stands out; a scene may blend two into a gradient and add noise.
BACKGROUNDS = {
    "white": (245, 245, 242),
    "gray": (200, 200, 200),
    "beige": (232, 222, 196),
    "light blue": (198, 218, 240),
    "light green": (208, 234, 204),
    "pink": (242, 212, 220),
}
# Colour and shape pairs no training or validation scene contains and every test scene does: the test split asks
# about combinations the model never saw.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("blue", "cross"), ("yellow", "circle"), ("purple", "square")})
SPLITS = ("train", "validation", "test")
MIN_OBJECTS, MAX_OBJECTS = 2, 9
# Half the side of a shape, as a fraction of the cell's side, by size.
HALF_EXTENT = {"small": 0.2, "large": 0.38}


@dataclass(frozen=True)
class SceneObject:
    cell: int  # 0..8, in reading order
    color: str
    shape: str
    size: str

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def column(self) -> int:
        return self.cell % GRID

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order
    background: str
    gradient_to: str | None  # a second background colour the picture fades to, top to bottom
    noise: float  # standard deviation of the pixel noise, in 0..255 units
    seed: str  # what the picture's jitter is drawn from

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset((obj.color, obj.shape) for obj in self.objects)


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of one scene: scene `index` of a split does not depend on how many others are drawn."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the splits are {', '.join(SPLITS)}.")
    return random.Random(f"twigvlm-synthetic-vqa/{seed}/{split}/{index}")


def allowed_pairs(split: str) -> list[tuple[str, str]]:
    """The colour and shape pairs a scene of this split may hold (the test split may hold every pair)."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    return pairs if split == "test" else [pair for pair in pairs if pair not in HELD_OUT_PAIRS]


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """Scene `index` of `split`: 2 to 9 objects in distinct cells; test scenes hold at least one held-out pair."""
    rng = scene_rng(seed, split, index)
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(MIN_OBJECTS, MAX_OBJECTS)))
    pairs = [rng.choice(allowed_pairs(split)) for _ in cells]
    if split == "test" and not HELD_OUT_PAIRS & set(pairs):
        pairs[rng.randrange(len(pairs))] = rng.choice(sorted(HELD_OUT_PAIRS))
    objects = tuple(
        SceneObject(cell, color, shape, rng.choice(SIZES)) for cell, (color, shape) in zip(cells, pairs)
    )
    background = rng.choice(list(BACKGROUNDS))
    gradient_to = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else None
    noise = rng.choice((0.0, 4.0, 8.0))
    return Scene(objects, background, gradient_to, noise, seed=f"{seed}/{split}/{index}")


def shape_outline(shape: str, center_x: float, center_y: float, half: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape (None for the circle, drawn as an ellipse)."""
    x, y, h = center_x, center_y, half
    if shape == "square":
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "cross":
        t = h / 3  # half the width of each bar
        return [
            (x - t, y - h), (x + t, y - h), (x + t, y - t), (x + h, y - t), (x + h, y + t), (x + t, y + t),
            (x + t, y + h), (x - t, y + h), (x - t, y + t), (x - h, y + t), (x - h, y - t), (x - t, y - t),
        ]  # fmt: skip
    if shape == "circle":
        return None
    raise ValueError(f"Unknown shape {shape!r}")


def object_center(obj: SceneObject, image_size: int, rng: random.Random) -> tuple[float, float]:
    """The object's centre: its cell's centre moved by a jitter that keeps the shape inside the cell."""
    cell_side = image_size / GRID
    slack = (0.5 - HALF_EXTENT[obj.size]) * cell_side * 0.8
    return (
        (obj.column + 0.5) * cell_side + rng.uniform(-slack, slack),
        (obj.row + 0.5) * cell_side + rng.uniform(-slack, slack),
    )


def picture_draws(scene: Scene, image_size: int) -> tuple[int | None, list[tuple[float, float]]]:
    """The random draws of the scene's picture: the pixel noise's seed (None without noise) and each object's centre."""
    rng = random.Random(f"render/{scene.seed}/{image_size}")
    noise_seed = rng.getrandbits(32) if scene.noise else None
    return noise_seed, [object_center(obj, image_size, rng) for obj in scene.objects]


def render(scene: Scene, image_size: int) -> Image.Image:
    """The scene's picture, `image_size` pixels square; the same scene always gives the same pixels."""
    noise_seed, centers = picture_draws(scene, image_size)
    top = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    bottom = np.array(BACKGROUNDS[scene.gradient_to or scene.background], dtype=np.float32)
    fade = np.linspace(0.0, 1.0, image_size, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top + (bottom - top) * fade, (image_size, image_size, 3)).copy()
    if noise_seed is not None:
        noise_rng = np.random.default_rng(noise_seed)
        pixels += noise_rng.normal(0.0, scene.noise, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj, (center_x, center_y) in zip(scene.objects, centers):
        half = HALF_EXTENT[obj.size] * image_size / GRID
        outline = shape_outline(obj.shape, center_x, center_y, half)
        if outline is None:
            draw.ellipse((center_x - half, center_y - half, center_x + half, center_y + half), fill=COLORS[obj.color])
        else:
            draw.polygon(outline, fill=COLORS[obj.color])
    return image
