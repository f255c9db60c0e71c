"""
Tensor names of every supported input layout, as renaming rules onto TwigVLM's names.

TwigVLM keeps transformers-5 LLaVA names for the base (`model.language_model.*`, `model.vision_tower.*` without a
`vision_model.` level, `model.multi_modal_projector.linear_{1,2}.*`, `lm_head.weight`) and puts the twig under
`model.twig.*`. Each rule is a regular expression on a source name and its replacement; a source tensor that no rule
renames and no documented exception covers is an error, never silently dropped.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path


Rules = tuple[tuple[str, str], ...]

# The LLaVA-1.5 release (`LlavaLlamaForCausalLM`, liuhaotian/llava-v1.5-*): Vicuna names plus the `mm_projector`.
ORIGINAL_LLAVA: Rules = (
    (r"^model\.embed_tokens\.", "model.language_model.embed_tokens."),
    (r"^model\.layers\.", "model.language_model.layers."),
    (r"^model\.norm\.", "model.language_model.norm."),
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^lm_head\.", "lm_head."),
)
# openai/clip-vit-large-patch14-336 (`CLIPModel`): only the vision side is LLaVA's.
CLIP: Rules = ((r"^vision_model\.", "model.vision_tower."),)
# llava-hf/llava-1.5-*-hf as `save_pretrained` writes it: transformers 4 with a `vision_model.` level in the tower,
# transformers 5 without (5.x saves LLaVA under these legacy names, reversing its own key renaming).
LLAVA_HF_SAVED: Rules = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
# The module names of transformers 5's LLaVA (a state dict saved as it is): already TwigVLM's base names.
LLAVA_MODULE_NAMES: Rules = (
    (r"^(model\.(language_model|vision_tower|multi_modal_projector)\.)", r"\1"),
    (r"^lm_head\.", "lm_head."),
)
# The twig as the TwigVLM authors release it (twigvlm-method.md §4): their training deleted base layers 0..K-1, so
# the twig's layers are numbered from 0.
AUTHORS_TWIG: Rules = (
    (r"^model\.layers\.", "model.twig.layers."),
    (r"^model\.norm\.", "model.twig.norm."),
    (r"^lm_head\.", "model.twig.lm_head."),
)

# Going back: a TwigVLM checkpoint's base as a llava-hf checkpoint, its twig in the authors' layout.
TWIG_TO_AUTHORS: Rules = (
    (r"^model\.twig\.layers\.", "model.layers."),
    (r"^model\.twig\.norm\.", "model.norm."),
    (r"^model\.twig\.lm_head\.", "lm_head."),
)

# Documented exceptions: tensors a checkpoint may hold that no model needs, and why.
ROTARY_BUFFERS = {r"\.rotary_emb\.inv_freq$": "rotary frequencies, a buffer transformers < 4.32 saved; recomputed"}
CLIP_UNUSED = {
    r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)": "CLIP's text tower and projections, unused by LLaVA",
    r"embeddings\.position_ids$": "CLIP's position ids, a buffer older transformers saved; recomputed",
}
LLAVA_HF_UNUSED = {r"embeddings\.position_ids$": CLIP_UNUSED[r"embeddings\.position_ids$"]}


@dataclass(frozen=True)
class Layout:
    """How one input checkpoint's names become TwigVLM's."""

    name: str
    rules: Rules
    ignored: dict[str, str]

    def target_name(self, source_name: str) -> str | None:
        for pattern, replacement in self.rules:
            if re.search(pattern, source_name):
                return re.sub(pattern, replacement, source_name, count=1)
        return None

    def ignore_reason(self, source_name: str) -> str | None:
        for pattern, reason in self.ignored.items():
            if re.search(pattern, source_name):
                return reason
        return None


ORIGINAL_LLAVA_LAYOUT = Layout("LLaVA-1.5 original release", ORIGINAL_LLAVA, ROTARY_BUFFERS)
CLIP_LAYOUT = Layout("CLIP vision tower", CLIP, CLIP_UNUSED)
LLAVA_HF_SAVED_LAYOUT = Layout("llava-hf (saved names)", LLAVA_HF_SAVED, {**ROTARY_BUFFERS, **LLAVA_HF_UNUSED})
LLAVA_MODULE_NAMES_LAYOUT = Layout("llava-hf (module names)", LLAVA_MODULE_NAMES, {**ROTARY_BUFFERS, **LLAVA_HF_UNUSED})
AUTHORS_TWIG_LAYOUT = Layout("TwigVLM authors' twig", AUTHORS_TWIG, ROTARY_BUFFERS)
TWIGVLM_BASE_LAYOUT = Layout("TwigVLM base", LLAVA_MODULE_NAMES, {r"^model\.twig\.": "the twig, exported on its own"})
TWIGVLM_TWIG_LAYOUT = Layout("TwigVLM twig", TWIG_TO_AUTHORS, {r"^(?!model\.twig\.)": "the base, exported on its own"})


def grown_twig_source(twig_name: str, twig_attach_layer: int) -> str:
    """The base tensor a fresh twig copies (twigvlm-method.md §1): layer K+i for twig layer i, the norm, the LM head."""
    if match := re.match(r"^model\.twig\.layers\.(\d+)\.(.*)$", twig_name):
        return f"model.language_model.layers.{twig_attach_layer + int(match.group(1))}.{match.group(2)}"
    return {"model.twig.norm.weight": "model.language_model.norm.weight", "model.twig.lm_head.weight": "lm_head.weight"}[
        twig_name
    ]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a LLaVA checkpoint folder?")
    return json.loads(path.read_text())


def is_original_llava(config: dict) -> bool:
    """The original release marks itself with the `mm_*` fields of its training code."""
    return "mm_vision_tower" in config or "mm_projector_type" in config


def llava_hf_layout(names: list[str]) -> Layout:
    """llava-hf checkpoints come under the names `save_pretrained` writes or under the module names; tell which."""
    if any(name.startswith("language_model.model.") for name in names):
        return LLAVA_HF_SAVED_LAYOUT
    if any(name.startswith("model.language_model.") for name in names):
        return LLAVA_MODULE_NAMES_LAYOUT
    raise ValueError(
        "The llava-hf checkpoint has neither saved LLaVA names (language_model.model.*) nor module names "
        "(model.language_model.*); it is not a LlavaForConditionalGeneration checkpoint."
    )


def count_twig_layers(names: list[str]) -> int:
    """T: the authors' twig files record it only through their layer names `model.layers.{0..T-1}`."""
    indices = {int(match.group(1)) for name in names if (match := re.match(r"^model\.layers\.(\d+)\.", name))}
    if not indices:
        raise ValueError("The twig checkpoint has no model.layers.* tensors; is it a TwigVLM twig?")
    if indices != set(range(len(indices))):
        raise ValueError(f"The twig's layers are numbered {sorted(indices)}, not 0..{len(indices) - 1}.")
    return len(indices)
