"""
Everything a conversion reads, gathered and checked before anything is written: the TwigVLM config, which input
tensor becomes which output tensor, the processor, and what the model card says about the sources.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaProcessor
from transformers.utils import is_protobuf_available, is_sentencepiece_available

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration
from twigvlm.presets import available_presets, load_preset

from .checkpoint import Checkpoint
from .configs import TwigSettings, config_from_llava_hf, config_from_original
from .layouts import (
    AUTHORS_TWIG_LAYOUT,
    CLIP_LAYOUT,
    ORIGINAL_LLAVA_LAYOUT,
    Layout,
    count_twig_layers,
    grown_twig_source,
    is_original_llava,
    llava_hf_layout,
    read_config,
)
from .plan import PlannedTensor, check_complete, expected_shapes, plan_tensors
from .processing import IMAGE_TOKEN, build_llava15_processor
from .sources import Source, resolve_source


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class ConversionInputs:
    config: TwigVLMConfig
    tensors: dict[str, PlannedTensor]
    processor: LlavaProcessor
    token_ids: dict
    source_dtype: torch.dtype
    sources: list[Source]
    base_model: str | None
    base_description: str
    grown_twig: bool
    image_token_added: bool


@dataclass(frozen=True)
class TwigOptions:
    """The twig-related command-line choices; anything left None comes from the preset of the base model."""

    twig: Source | None = None
    preset: str | None = None
    twig_attach_layer: int | None = None
    final_wipe_layer: int | str | None = None  # "none" turns FinalWipe off
    visual_token_budget: float | None = None
    num_twig_layers: int | None = None  # only for a grown twig: the authors' twig files record T

    def preset_for(self, num_base_layers: int) -> dict:
        """The named preset, else the one preset for a base of this depth (32 layers: 7B, 40: 13B), else none."""
        if self.preset:
            preset = load_preset(self.preset)
            if preset["num_base_layers"] != num_base_layers:
                raise ValueError(
                    f"Preset {self.preset} is for {preset['num_base_layers']} layers; this base has {num_base_layers}."
                )
            return preset
        matches = [load_preset(name) for name in available_presets()]
        matches = [preset for preset in matches if preset["num_base_layers"] == num_base_layers]
        return matches[0] if len(matches) == 1 else {}

    def resolve(self, num_base_layers: int, twig: Checkpoint | None) -> tuple[TwigSettings, int]:
        """The twig settings and T (counted in the twig's files, or chosen for a grown twig)."""
        preset = self.preset_for(num_base_layers)

        def pick(field: str):
            value = getattr(self, field)
            value = preset.get(field) if value is None else value
            if value is None:
                option = "--" + field.replace("_", "-")
                raise ValueError(f"No preset fits a base of {num_base_layers} layers; pass {option} (or --preset).")
            return value

        final_wipe = pick("final_wipe_layer")
        settings = TwigSettings(
            twig_attach_layer=pick("twig_attach_layer"),
            final_wipe_layer=None if final_wipe == "none" else int(final_wipe),
            visual_token_budget=pick("visual_token_budget"),
        )
        if twig is None:
            return settings, pick("num_twig_layers")
        if self.num_twig_layers is not None:
            raise ValueError("--num-twig-layers is only for --grow: the twig's files give its number of layers.")
        return settings, count_twig_layers(twig.names())


def load_tokenizer(source: Source):
    folder = source.folder
    if not (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file():
        if not (is_sentencepiece_available() and is_protobuf_available()):
            raise ImportError(
                f"The tokenizer of {source.spec} is a sentencepiece model (tokenizer.model) without tokenizer.json; "
                "reading it needs `pip install sentencepiece protobuf`. Alternatively pass --tokenizer with a folder "
                "or Hub id whose tokenizer.json has the same vocabulary (llava-hf/llava-1.5-7b-hf has)."
            )
    return AutoTokenizer.from_pretrained(folder)


def token_ids(folder: Path, text_config: dict) -> dict:
    """BOS, EOS and padding ids from the source's generation config, else from its model config."""
    path = folder / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    return {field: generation.get(field, text_config.get(field)) for field in TOKEN_ID_FIELDS}


def image_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """
    The image normalisation a folder states: preprocessor_config.json, or the image processor that transformers 5
    nests in processor_config.json. Read as JSON, so that no image-processor backend (torchvision) is needed.
    """
    preprocessor_path, processor_path = folder / "preprocessor_config.json", folder / "processor_config.json"
    if preprocessor_path.is_file():
        preprocessor = json.loads(preprocessor_path.read_text())
    elif processor_path.is_file():
        preprocessor = json.loads(processor_path.read_text()).get("image_processor", {})
    else:
        preprocessor = {}
    if "image_mean" not in preprocessor or "image_std" not in preprocessor:
        raise FileNotFoundError(
            f"{folder} states no image_mean/image_std (in preprocessor_config.json or processor_config.json)."
        )
    return tuple(preprocessor["image_mean"]), tuple(preprocessor["image_std"])


def build_processor(tokenizer_source: Source, image_processor_folder: Path, config: TwigVLMConfig) -> LlavaProcessor:
    """LLaVA-1.5's processor with the source's tokenizer and CLIP normalisation; `<image>` must be the config's token."""
    tokenizer = load_tokenizer(tokenizer_source)
    image_mean, image_std = image_normalisation(image_processor_folder)
    vision_config = config.vision_config
    processor = build_llava15_processor(
        tokenizer,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        image_mean=image_mean,
        image_std=image_std,
    )
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != config.image_token_index:
        raise ValueError(
            f"The tokenizer of {tokenizer_source.spec} gives {IMAGE_TOKEN} the id {image_token_id}, but the model "
            f"expects {config.image_token_index}: the tokenizer's vocabulary is not the model's."
        )
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer of {tokenizer_source.spec} has {len(processor.tokenizer)} tokens, more than the model's "
            f"{config.text_config.vocab_size} embeddings."
        )
    return processor


def complete_plan(config: TwigVLMConfig, inputs: list[tuple[Checkpoint, Layout]], grow: bool) -> dict[str, PlannedTensor]:
    """The whole output: the inputs' tensors, plus (growing) the twig copied from the base; checked complete."""
    expected = expected_shapes(TwigVLMForConditionalGeneration, config)
    plan = plan_tensors(expected, inputs)
    if grow:
        for name, shape in expected.items():
            if name.startswith("model.twig."):
                plan[name] = replace(plan[grown_twig_source(name, config.twig_attach_layer)], shape=shape)
    check_complete(plan, expected)
    return plan


def load_inputs(
    llava: Source,
    options: TwigOptions,
    vision_tower: Source | None = None,
    tokenizer: Source | None = None,
    vocab_multiple: int = 64,
) -> ConversionInputs:
    """Read and check the inputs of either source layout: the original LLaVA-1.5 release (plus CLIP) or llava-hf."""
    if is_original_llava(read_config(llava.folder)):
        return load_original(llava, options, vision_tower, tokenizer, vocab_multiple)
    if vision_tower is not None:
        raise ValueError("--vision-tower is only for the original LLaVA-1.5 layout; a llava-hf checkpoint has its own.")
    return load_llava_hf(llava, options, tokenizer)


def twig_checkpoint(options: TwigOptions) -> Checkpoint | None:
    return Checkpoint(options.twig.folder, "twig checkpoint") if options.twig else None


def load_original(
    llava: Source, options: TwigOptions, vision_tower: Source | None, tokenizer: Source | None, vocab_multiple: int
) -> ConversionInputs:
    original = read_config(llava.folder)
    vision_tower = vision_tower or resolve_source(original["mm_vision_tower"])
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower.folder)
    llava_checkpoint = Checkpoint(llava.folder, "LLaVA checkpoint")
    clip_checkpoint = Checkpoint(vision_tower.folder, "vision tower checkpoint")
    twig = twig_checkpoint(options)
    num_layers = original["num_hidden_layers"]
    config = config_from_original(original, vision_config, *options.resolve(num_layers, twig), vocab_multiple)
    checkpoints = [(llava_checkpoint, ORIGINAL_LLAVA_LAYOUT), (clip_checkpoint, CLIP_LAYOUT)]
    plan = complete_plan(config, checkpoints + ([(twig, AUTHORS_TWIG_LAYOUT)] if twig else []), grow=twig is None)
    return ConversionInputs(
        config=config,
        tensors=plan,
        processor=build_processor(tokenizer or llava, vision_tower.folder, config),
        token_ids=token_ids(llava.folder, original),
        source_dtype=llava_checkpoint.load("lm_head.weight").dtype,
        sources=[llava, vision_tower] + ([options.twig] if options.twig else []) + ([tokenizer] if tokenizer else []),
        base_model=hub_id(llava) or options.preset_for(num_layers).get("base_model"),
        base_description=f"LLaVA-1.5 ({num_layers} layers) with the {vision_tower.spec} vision tower",
        grown_twig=twig is None,
        image_token_added=True,
    )


def load_llava_hf(llava: Source, options: TwigOptions, tokenizer: Source | None) -> ConversionInputs:
    llava_config = LlavaConfig.from_pretrained(llava.folder)
    checkpoint = Checkpoint(llava.folder, "llava-hf checkpoint")
    layout = llava_hf_layout(checkpoint.names())
    twig = twig_checkpoint(options)
    num_layers = llava_config.text_config.num_hidden_layers
    config = config_from_llava_hf(llava_config, *options.resolve(num_layers, twig))
    plan = complete_plan(config, [(checkpoint, layout)] + ([(twig, AUTHORS_TWIG_LAYOUT)] if twig else []), twig is None)
    return ConversionInputs(
        config=config,
        tensors=plan,
        processor=build_processor(tokenizer or llava, llava.folder, config),
        token_ids=token_ids(llava.folder, llava_config.text_config.to_dict()),
        source_dtype=checkpoint.load(plan["lm_head.weight"].source_name).dtype,
        sources=[llava] + ([options.twig] if options.twig else []) + ([tokenizer] if tokenizer else []),
        base_model=hub_id(llava) or options.preset_for(num_layers).get("llava_hf_model"),
        base_description=f"LLaVA-1.5 in the llava-hf layout ({num_layers} layers)",
        grown_twig=twig is None,
        image_token_added=False,
    )


def hub_id(source: Source) -> str | None:
    return source.spec.partition("@")[0] if source.commit else None
