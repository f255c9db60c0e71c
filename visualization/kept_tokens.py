"""
Pictures of the visual tokens each token-reduction method keeps, side by side for one image and prompt.

The image tokens of a prompt are the `<image>` positions of its `input_ids`, in the raster order of the vision
tower's patch grid (24×24 for LLaVA-1.5 at 336 px). With LLaVA-1.5's pad-to-square the grid covers the padded square
image, so the pictures show that square, bands included. A method's kept set is read from the model's cache after
the prefill: `kept_prompt_positions[layer]` lists the prompt positions the layers from `layer` on hold; the first
(lowest) such layer is where the method chose. A merging method can also leave `merged_into_positions[layer]`, a
`[batch, prompt_length]` tensor giving, for each prompt position, the position of the kept token it was merged into
(-1 or itself when it was not merged); the picture then tints each merged patch with the colour of its kept token.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from twigvlm import output_cache
from twigvlm.token_reduction_twigvlm import supported_token_reductions

from twigvlm.evaluation.prompting import chat_inputs


MARGIN, GAP, TITLE_HEIGHT = 8, 8, 22
DIM = 0.75  # how far a dropped patch is darkened towards black
MERGE_TINT = 0.55  # how far a merged patch is tinted towards its kept token's colour
KEPT_BORDER = (255, 196, 0)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]  # fmt: skip


@dataclass
class KeptPatches:
    """Which patches of the grid one method kept (raster indices) and, for merging methods, what merged where."""

    method: str
    grid_size: int
    kept: list[int]
    merged_into: dict[int, int] = field(default_factory=dict)
    layer: int | None = None

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def title(self) -> str:
        where = "" if self.layer is None else f" from layer {self.layer}"
        merged = f", {len(self.merged_into)} merged" if self.merged_into else ""
        return f"{self.method}: {len(self.kept)}/{self.num_patches} kept{where}{merged}"


def model_view(image: Image.Image, image_processor) -> Image.Image:
    """
    The square the patch grid covers, in the image's own resolution: the image padded to a square with the mean
    colour, centred, as LLaVA-1.5's `expand2square` and transformers' `do_pad` do; without padding, the centre square
    that resizing the short side and centre-cropping keep.
    """
    image = image.convert("RGB")
    width, height = image.size
    side = max(width, height)
    if getattr(image_processor, "do_pad", False):
        background = tuple(int(255 * mean) for mean in image_processor.image_mean)
        square = Image.new("RGB", (side, side), background)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def find_kept_patches(
    model,
    processor,
    image: Image.Image,
    prompt: str,
    method: str,
    visual_token_budget: float | None = None,
    num_kept_visual_tokens: int | None = None,
) -> KeptPatches:
    """Run the prefill of `prompt` about `image` with one method and read which patches it kept."""
    inputs = chat_inputs(processor, [prompt], [[image]], model.device, model.dtype)
    budget = {
        key: value
        for key, value in dict(visual_token_budget=visual_token_budget, num_kept_visual_tokens=num_kept_visual_tokens).items()
        if value is not None
    }
    with torch.inference_mode():
        output = model(**inputs, token_reduction=method, **budget, use_cache=True, logits_to_keep=1)
    image_positions = (inputs["input_ids"][0] == model.config.image_token_index).nonzero()[:, 0].tolist()
    grid_size = math.isqrt(len(image_positions))
    if grid_size**2 != len(image_positions):
        raise ValueError(f"{len(image_positions)} image tokens do not form a square patch grid.")
    patch_of = {position: patch for patch, position in enumerate(image_positions)}

    cache = output_cache(output)
    kept_positions = getattr(cache, "kept_prompt_positions", {})
    if not kept_positions:  # nothing pruned
        return KeptPatches(method, grid_size, list(range(len(image_positions))))
    layer = min(kept_positions)
    kept = [patch_of[position] for position in kept_positions[layer][0].tolist() if position in patch_of]
    merged_into = {}
    merges = getattr(cache, "merged_into_positions", {}).get(layer)
    if merges is not None:
        for position, target in enumerate(merges[0].tolist()):
            if position in patch_of and target in patch_of and target != position:
                merged_into[patch_of[position]] = patch_of[target]
    return KeptPatches(method, grid_size, kept, merged_into, layer)


def draw_kept_patches(view: Image.Image, results: list[KeptPatches], panel_size: int = 336) -> Image.Image:
    """
    The model's view of the image, then one panel per method: kept patches as they are (outlined), dropped patches
    darkened, merged patches tinted with the colour of the kept token they joined (which is outlined in it).
    """
    grid_size = results[0].grid_size
    cell = max(1, panel_size // grid_size)
    panel_size = cell * grid_size
    view = view.convert("RGB").resize((panel_size, panel_size), Image.Resampling.BICUBIC)
    panels = [("image as the model sees it", view)] + [(result.title(), _panel(view, result, cell)) for result in results]

    width = 2 * MARGIN + len(panels) * panel_size + (len(panels) - 1) * GAP
    canvas = Image.new("RGB", (width, 2 * MARGIN + TITLE_HEIGHT + panel_size), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for index, (title, panel) in enumerate(panels):
        left = MARGIN + index * (panel_size + GAP)
        draw.text((left, MARGIN), title, fill="black", font=font)
        canvas.paste(panel, (left, MARGIN + TITLE_HEIGHT))
    return canvas


def _panel(view: Image.Image, result: KeptPatches, cell: int) -> Image.Image:
    panel = view.copy()
    dimmed = Image.blend(view, Image.new("RGB", view.size, "black"), DIM)
    targets = sorted(set(result.merged_into.values()))
    colour_of = {target: PALETTE[i % len(PALETTE)] for i, target in enumerate(targets)}
    kept = set(result.kept)
    for patch in range(result.num_patches):
        box = _cell_box(patch, result.grid_size, cell)
        if patch in result.merged_into:
            tint = Image.new("RGB", (cell, cell), colour_of[result.merged_into[patch]])
            panel.paste(Image.blend(view.crop(box), tint, MERGE_TINT), box[:2])
        elif patch not in kept:
            panel.paste(dimmed.crop(box), box[:2])
    draw = ImageDraw.Draw(panel)
    if cell >= 6 and len(kept) < result.num_patches:
        for patch in kept:
            left, top, right, bottom = _cell_box(patch, result.grid_size, cell)
            draw.rectangle((left, top, right - 1, bottom - 1), outline=colour_of.get(patch, KEPT_BORDER))
    return panel


def _cell_box(patch: int, grid_size: int, cell: int) -> tuple[int, int, int, int]:
    row, column = divmod(patch, grid_size)
    return column * cell, row * cell, (column + 1) * cell, (row + 1) * cell


def show_kept(
    model,
    processor,
    image: Image.Image,
    prompt: str,
    methods: list[str] | None = None,
    visual_token_budget: float | None = None,
    num_kept_visual_tokens: int | None = None,
    path: str | Path | None = None,
    panel_size: int = 336,
) -> Image.Image:
    """
    The kept-token picture for `image` and `prompt`: every method (default: every token reduction the model can run at
    this budget with its default settings, `none` aside) at the same budget, side by side; saved as PNG at `path` if
    given.
    """
    if not methods:
        supported = supported_token_reductions(model.config, visual_token_budget, num_kept_visual_tokens)
        methods = [method for method in supported if method != "none"]
    results = [
        find_kept_patches(model, processor, image, prompt, method, visual_token_budget, num_kept_visual_tokens)
        for method in methods
    ]
    picture = draw_kept_patches(model_view(image, processor.image_processor), results, panel_size)
    if path is not None:
        picture.save(path, format="PNG")
    return picture
