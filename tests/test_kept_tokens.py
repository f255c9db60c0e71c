"""Kept-token pictures: the grid is the one the model sees, and exactly the kept patches stay bright."""

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import IMAGE_SIZE, tiny_twigvlm
from tiny_processor import tiny_processor
from twigvlm import output_cache
from twigvlm.evaluation.prompting import chat_inputs
from twigvlm.visualization import KeptPatches, draw_kept_patches, find_kept_patches, model_view, show_kept
from twigvlm.visualization.kept_tokens import DIM, GAP, MARGIN, MERGE_TINT, PALETTE, TITLE_HEIGHT


GRID, BLOCK = 4, 28  # the tiny model's 4×4 patch grid; blocks of 28 px make each patch one flat colour
PROMPT = "Which block is brightest?"


def block_colour(row: int, column: int) -> tuple[int, int, int]:
    return (40 + 50 * column, 40 + 60 * row, 200 - 40 * column)


def blocks_image(rows: int) -> Image.Image:
    """`rows` rows of GRID flat-coloured blocks: rows=GRID is square, rows=2 is wide and gets padded top and bottom."""
    image = Image.new("RGB", (GRID * BLOCK, rows * BLOCK))
    for row in range(rows):
        for column in range(GRID):
            box = (column * BLOCK, row * BLOCK, (column + 1) * BLOCK, (row + 1) * BLOCK)
            image.paste(block_colour(row, column), box)
    return image


def centre_colours(picture: Image.Image, left: int, top: int, cell: int) -> list[np.ndarray]:
    """The colour at the centre of each patch cell of the panel at (left, top), in raster order."""
    pixels = np.asarray(picture.convert("RGB"), dtype=int)
    return [
        pixels[top + row * cell + cell // 2, left + column * cell + cell // 2]
        for row in range(GRID)
        for column in range(GRID)
    ]


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_twigvlm(), tiny_processor()


def test_the_picture_grid_is_the_grid_the_model_sees(model_and_processor):
    """A wide image: pad-to-square puts mean-colour bands in grid rows 0 and 3, the image in rows 1 and 2."""
    _, processor = model_and_processor
    image = blocks_image(rows=2)
    pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    seen = ((pixel_values * std + mean) * 255).round().permute(1, 2, 0).numpy()
    view = np.asarray(model_view(image, processor.image_processor).resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=float)
    background = [int(255 * m) for m in processor.image_processor.image_mean]

    cell = IMAGE_SIZE // GRID
    for patch in range(GRID * GRID):
        row, column = divmod(patch, GRID)
        y, x = row * cell + cell // 2, column * cell + cell // 2
        expected = background if row in (0, 3) else block_colour(row - 1, column)
        np.testing.assert_allclose(seen[y, x], expected, atol=2, err_msg=f"model input, patch {patch}")
        np.testing.assert_allclose(view[y, x], expected, atol=2, err_msg=f"picture, patch {patch}")


def test_highlighted_patches_are_exactly_the_kept_ones(model_and_processor, tmp_path):
    model, processor = model_and_processor
    image = blocks_image(rows=GRID)
    path = tmp_path / "kept.png"
    show_kept(model, processor, image, PROMPT, methods=["twig", "none"], num_kept_visual_tokens=5, path=path, panel_size=112)

    # The kept indices, straight from the model: positions kept from layer K, counted from the first image token.
    inputs = chat_inputs(processor, [PROMPT], [[image]], model.device, model.dtype)
    with torch.inference_mode():
        cache = output_cache(model(**inputs, token_reduction="twig", num_kept_visual_tokens=5, use_cache=True))
    first_image_position = int((inputs["input_ids"][0] == model.config.image_token_index).nonzero()[0])
    kept_positions = cache.kept_prompt_positions[model.config.twig_attach_layer][0]
    expected_kept = {p - first_image_position for p in kept_positions.tolist() if p >= first_image_position}
    expected_kept = {p for p in expected_kept if p < GRID * GRID}
    assert len(expected_kept) == 5

    picture = Image.open(path)
    assert picture.format == "PNG"
    panel, cell = 112, 112 // GRID
    assert picture.size == (2 * MARGIN + 3 * panel + 2 * GAP, 2 * MARGIN + TITLE_HEIGHT + panel)
    top = MARGIN + TITLE_HEIGHT
    image_panel, twig_panel, none_panel = (centre_colours(picture, MARGIN + i * (panel + GAP), top, cell) for i in range(3))
    for patch in range(GRID * GRID):
        original = np.array(block_colour(*divmod(patch, GRID)))
        np.testing.assert_allclose(image_panel[patch], original, atol=2)
        np.testing.assert_allclose(none_panel[patch], original, atol=2)
        shown = original if patch in expected_kept else original * (1 - DIM)
        np.testing.assert_allclose(twig_panel[patch], shown, atol=2, err_msg=f"patch {patch}")


def test_budget_sets_the_kept_count(model_and_processor):
    model, processor = model_and_processor
    result = find_kept_patches(model, processor, blocks_image(rows=2), PROMPT, "twig", visual_token_budget=8)
    # R = ceil((L·R̄ − K·M) / (F − K)) = ceil((8·8 − 2·16) / 4) = 8
    assert len(result.kept) == 8 and result.layer == 2 and result.merged_into == {}
    assert result.title() == "twig: 8/16 kept from layer 2"


def test_merged_patches_take_the_colour_of_their_kept_token():
    view = blocks_image(rows=GRID)
    merge = KeptPatches("merging", GRID, kept=[0, 5], merged_into={1: 0, 4: 0, 6: 5, 10: 5}, layer=0)
    picture = draw_kept_patches(view, [merge], panel_size=112)
    cell = 112 // GRID
    shown = centre_colours(picture, MARGIN + 112 + GAP, MARGIN + TITLE_HEIGHT, cell)
    colour_of = {0: np.array(PALETTE[0]), 5: np.array(PALETTE[1])}
    for patch in range(GRID * GRID):
        original = np.array(block_colour(*divmod(patch, GRID)))
        if patch in merge.merged_into:
            expected = original * (1 - MERGE_TINT) + colour_of[merge.merged_into[patch]] * MERGE_TINT
        elif patch in merge.kept:
            expected = original
        else:
            expected = original * (1 - DIM)
        np.testing.assert_allclose(shown[patch], expected, atol=2, err_msg=f"patch {patch}")
    # Each kept token that received merges is outlined in its cluster's colour.
    pixels = np.asarray(picture)
    left, top = MARGIN + 112 + GAP, MARGIN + TITLE_HEIGHT
    np.testing.assert_array_equal(pixels[top + cell + cell // 2, left + cell], PALETTE[1])
    assert merge.title() == "merging: 2/16 kept from layer 0, 4 merged"
