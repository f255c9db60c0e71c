"""`twigvlm-convert`: build a Hub-ready TwigVLM folder from released checkpoints, or export its parts back."""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from .build import SelfCheckFailed, write_twigvlm
from .export import export_base, export_twig
from .inputs import TwigOptions, load_inputs
from .sources import resolve_source


# Errors about the inputs or the output folder (CheckpointError is a ValueError), reported as one message.
USER_ERRORS = (ValueError, OSError, ImportError, SelfCheckFailed)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DESCRIPTION = """\
Convert LLaVA-1.5 and a TwigVLM twig into one TwigVLM checkpoint folder (sharded safetensors, config with auto_map,
remote code, processor, generation config, model card), or export a TwigVLM folder's base or twig back.

Inputs are local folders or Hub ids (owner/name or owner/name@revision, downloaded through huggingface_hub's cache).
Example, LLaVA-1.5-7B with the authors' released twig:

  twigvlm-convert build --llava liuhaotian/llava-v1.5-7b --twig ./TwigVLM-llava-v1.5-7b-K2-T3 \\
      --output ./twigvlm-llava-v1.5-7b --repo-id your-name/twigvlm-llava-v1.5-7b
"""


def final_wipe_layer(value: str) -> int | str:
    return "none" if value.lower() == "none" else int(value)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, type=Path, help="Folder to write. It appears only when complete.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists (default: refuse).")


def add_shard_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="Largest safetensors shard, e.g. 5GB or 500MB (default: 5GB). Shards are written one at a time, so "
        "memory holds about one shard.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twigvlm-convert", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build",
        help="LLaVA-1.5 (original or llava-hf layout) + a twig -> a TwigVLM folder.",
        description="Build a TwigVLM folder. The layout of --llava is detected: the original release (config.json "
        "with mm_* fields, liuhaotian/llava-v1.5-7b) or llava-hf (llava-hf/llava-1.5-7b-hf, transformers-4 or -5 "
        "tensor names). Every input tensor must be used or be a documented exception (rotary inv_freq and CLIP "
        "position_ids buffers, CLIP's text tower), else the conversion stops and names it.",
    )
    build.add_argument("--llava", required=True, help="LLaVA-1.5 checkpoint: original release or llava-hf layout.")
    twig = build.add_mutually_exclusive_group(required=True)
    twig.add_argument(
        "--twig",
        help="The twig as the TwigVLM authors release it: a folder whose model.safetensors holds model.layers.{0..T-1}.*, "
        "model.norm.weight and lm_head.weight. T is read from it.",
    )
    twig.add_argument(
        "--grow",
        action="store_true",
        help="No trained twig: start one as a copy of base layers K..K+T-1, the final norm and the LM head (to train).",
    )
    build.add_argument(
        "--vision-tower",
        help="Original layout only: the CLIP vision tower (openai/clip-vit-large-patch14-336 layout). Default: the "
        "mm_vision_tower named in the LLaVA config.json, as a Hub id.",
    )
    build.add_argument(
        "--tokenizer",
        help="Where to read the tokenizer (default: --llava). The original release ships only a sentencepiece "
        "tokenizer.model, which needs `pip install sentencepiece protobuf`; a folder or Hub id with tokenizer.json of "
        "the same vocabulary (e.g. llava-hf/llava-1.5-7b-hf) avoids that.",
    )
    build.add_argument(
        "--preset",
        help="Base-model preset for the defaults below (llava-v1.5-7b, llava-v1.5-13b). Default: the preset whose "
        "layer count matches the base.",
    )
    build.add_argument(
        "--twig-attach-layer", type=int, help="K: the twig reads the input of base layer K (default: preset, 2)."
    )
    build.add_argument(
        "--num-twig-layers", type=int, help="T, with --grow only: twig layers to copy (default: preset, 3)."
    )
    build.add_argument(
        "--final-wipe-layer",
        type=final_wipe_layer,
        help="F: all visual tokens are dropped before base layer F; 'none' keeps them to the last layer "
        "(default: preset, 24 for 7B).",
    )
    build.add_argument(
        "--visual-token-budget",
        type=float,
        help="Default R̄ written to the config: average visual tokens per layer (64, 128, 192; default: preset, 64). "
        "Users can change it per generate call.",
    )
    build.add_argument(
        "--dtype",
        choices=["keep", *DTYPES],
        default="keep",
        help="Dtype of every output tensor. 'keep' (default): the dtype of the LLaVA checkpoint's weights (float16 "
        "for the releases); the vision tower and the twig are cast to it. A value the dtype cannot hold is an error.",
    )
    add_shard_size(build)
    build.add_argument(
        "--vocab-multiple",
        type=int,
        default=64,
        help="Original layout only: the vocabulary gains <image> and is padded to a multiple of this many rows, as "
        "llava-hf does (default: 64, i.e. 32064 rows). Generation never produces the added ids.",
    )
    build.add_argument(
        "--skip-self-check",
        action="store_true",
        help="Do not load the written folder and compare its base and twig logits with transformers' LLaVA and the "
        "input twig on a probe image (by default the conversion refuses to finish if they differ beyond the dtype's "
        "tolerance).",
    )
    build.add_argument(
        "--self-check-device",
        default="auto",
        help="Device of the self-check, e.g. cpu or cuda:0 (default: cuda if available, else cpu). It holds one model "
        "at a time.",
    )
    build.add_argument(
        "--repo-id",
        help="Hub repository the folder is meant for, shown in the model card's usage (default: the output folder's name).",
    )
    build.add_argument(
        "--license",
        default="llama2",
        help="License of the weights for the card's front matter (default: llama2, inherited by LLaVA-1.5).",
    )
    add_output_arguments(build)

    base = commands.add_parser(
        "export-base",
        help="A TwigVLM folder's base alone, as a plain llava-hf checkpoint (LlavaForConditionalGeneration).",
    )
    base.add_argument("--twigvlm", required=True, type=Path, help="The TwigVLM folder.")
    add_shard_size(base)
    add_output_arguments(base)

    twig_export = commands.add_parser(
        "export-twig", help="A TwigVLM folder's twig alone, in the authors' release layout (one model.safetensors)."
    )
    twig_export.add_argument("--twigvlm", required=True, type=Path, help="The TwigVLM folder.")
    add_output_arguments(twig_export)
    return parser


def self_check_device(args: argparse.Namespace) -> str | None:
    if args.skip_self_check:
        return None
    if args.self_check_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.self_check_device


def run_build(args: argparse.Namespace, argv: list[str]) -> None:
    options = TwigOptions(
        twig=resolve_source(args.twig) if args.twig else None,
        preset=args.preset,
        twig_attach_layer=args.twig_attach_layer,
        final_wipe_layer=args.final_wipe_layer,
        visual_token_budget=args.visual_token_budget,
        num_twig_layers=args.num_twig_layers,
    )
    inputs = load_inputs(
        resolve_source(args.llava),
        options,
        vision_tower=resolve_source(args.vision_tower) if args.vision_tower else None,
        tokenizer=resolve_source(args.tokenizer) if args.tokenizer else None,
        vocab_multiple=args.vocab_multiple,
    )
    report = write_twigvlm(
        inputs,
        args.output,
        dtype=inputs.source_dtype if args.dtype == "keep" else DTYPES[args.dtype],
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        self_check_device=self_check_device(args),
        repo_id=args.repo_id or args.output.resolve().name,
        license=args.license,
        command=shlex.join(["twigvlm-convert", *argv]),
    )
    if report is not None:
        print(f"Self-check passed: {report.summary()}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            run_build(args, argv)
        elif args.command == "export-base":
            export_base(args.twigvlm, args.output, args.overwrite, args.max_shard_size)
        else:
            export_twig(args.twigvlm, args.output, args.overwrite)
    except USER_ERRORS as error:  # the inputs' fault, said in one message; anything else keeps its traceback
        parser.exit(1, f"twigvlm-convert: error: {error}\n")
    print(f"Wrote {args.output}")
