"""The bundled picture and question the `twigvlm` program asks about when given none: a scene of the test split."""

from pathlib import Path

from PIL import Image

from twigvlm.synthetic_vqa.scenes import render, sample_scene


ASSETS_DIR = Path(__file__).parent / "assets"
SAMPLE_IMAGE_PATH = ASSETS_DIR / "sample.png"
DEFAULT_QUESTION_PATH = ASSETS_DIR / "question.txt"
# Scene 3 of the test split (seed 0) at the bundled model's 96 pixels; the question is about it.
SAMPLE_SCENE = (0, "test", 3)
SAMPLE_IMAGE_SIZE = 96


def draw_sample_image() -> Image.Image:
    """Draws `assets/sample.png`."""
    return render(sample_scene(*SAMPLE_SCENE), SAMPLE_IMAGE_SIZE)


def default_question() -> str:
    return DEFAULT_QUESTION_PATH.read_text().strip()


if __name__ == "__main__":
    draw_sample_image().save(SAMPLE_IMAGE_PATH, optimize=True)
