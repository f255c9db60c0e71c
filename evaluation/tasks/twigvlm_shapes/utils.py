"""Synthetic shapes drawn from each document, so the task needs no image files and no download."""

from PIL import Image, ImageDraw


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """A wide image (it exercises pad-to-square) with one coloured shape."""
    image = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(image)
    box = (28, 12, 68, 52)
    fill = COLORS[doc["color"]]
    if doc["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif doc["shape"] == "triangle":
        draw.polygon([(48, 12), (28, 52), (68, 52)], fill=fill)
    else:
        draw.rectangle(box, fill=fill)
    return [image]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"
