"""The bundled sample picture and question the `twigvlm` program asks about when given none."""

from pathlib import Path

from PIL import Image, ImageDraw


ASSETS_DIR = Path(__file__).parent / "assets"
SAMPLE_IMAGE_PATH = ASSETS_DIR / "sample.png"
DEFAULT_QUESTION_PATH = ASSETS_DIR / "question.txt"


def draw_sample_image() -> Image.Image:
    """Draws `assets/sample.png`: three shapes on a sky-blue field above grass, wider than tall so it gets padded."""
    image = Image.new("RGB", (192, 128), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 96, 191, 127), fill=(70, 160, 70))
    draw.ellipse((16, 24, 72, 80), fill=(220, 40, 40))
    draw.polygon([(92, 84), (120, 28), (148, 84)], fill=(245, 205, 40))
    draw.rectangle((160, 48, 184, 72), fill=(40, 60, 200))
    return image


def default_question() -> str:
    return DEFAULT_QUESTION_PATH.read_text().strip()


if __name__ == "__main__":
    draw_sample_image().save(SAMPLE_IMAGE_PATH, optimize=True)
