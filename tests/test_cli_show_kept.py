"""`twigvlm --show-kept OUT.png`: the kept-token picture from the program, for the remote-code model it loads."""

import numpy as np
import pytest
from PIL import Image

from small_random_model import save_small_twigvlm
from twigvlm.app.cli import main
from twigvlm.visualization.kept_tokens import GAP, MARGIN, TITLE_HEIGHT


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The small random-weight TwigVLM (112 px, 8×8 patches) saved as a Hub-style folder."""
    folder = tmp_path_factory.mktemp("small") / "twigvlm-small"
    save_small_twigvlm(folder)
    return folder


def test_show_kept_draws_each_method_at_the_chosen_budget(capsys, small_checkpoint, tmp_path):
    out = tmp_path / "kept.png"
    argv = ["--model", str(small_checkpoint), "--max-new-tokens", "1", "--num-kept-visual-tokens", "5"]
    assert main(argv + ["--show-kept", str(out), "--show-kept-methods", "twig,none"]) == 0
    assert f"Kept-token picture: {out}" in capsys.readouterr().out

    picture = Image.open(out)
    assert picture.format == "PNG"
    grid, panel = 8, 336  # the small model's 112 px image in 14 px patches; 42 px cells
    assert picture.size == (2 * MARGIN + 3 * panel + 2 * GAP, 2 * MARGIN + TITLE_HEIGHT + panel)
    pixels = np.asarray(picture, dtype=int)
    cell, top = panel // grid, MARGIN + TITLE_HEIGHT

    def centres(index: int) -> np.ndarray:
        left = MARGIN + index * (panel + GAP)
        rows = top + np.arange(grid) * cell + cell // 2
        columns = left + np.arange(grid) * cell + cell // 2
        return pixels[rows[:, None], columns[None, :]].reshape(grid * grid, 3)

    image, twig, none = centres(0), centres(1), centres(2)
    bright = (np.abs(twig - image) <= 2).all(axis=1)
    assert bright.sum() == 5  # the five kept patches, and no other, keep the image's colours
    assert (np.abs(none - image) <= 2).all()


def test_show_kept_refuses_unknown_methods(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--show-kept", str(tmp_path / "kept.png"), "--show-kept-methods", "twig,nonsense"])
    assert "unknown nonsense; choose from twig, none" in capsys.readouterr().err
