"""The `twigvlm` program: a TwigVLM checkpoint answers a question about an image, loaded through the Auto classes."""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_flash_attn_2_available

from twigvlm import output_cache
from twigvlm.configuration_twigvlm import TOKEN_REDUCTIONS
from twigvlm.visualization import show_kept

from .sample import SAMPLE_IMAGE_PATH, default_question
from .bundled_model import BUNDLED_MODEL_DIR, save_bundled_model
from .streamer import DraftMarkingStreamer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUNDLED_MODEL_NOTE = (
    "No --model given: running the small TwigVLM trained in this repository on synthetic pictures of coloured shapes "
    "(a 12-layer LLaMA, 144 image tokens). It answers questions of that task only: colours, shapes, counts, yes/no, "
    "what is left/right/above/below an object, 'describe the image.' Pass --model PATH_OR_REPO for a real checkpoint."
)


def at_least(minimum: int, number_type: type = int):
    """An argparse type for numbers of `number_type` no smaller than `minimum`."""

    def parse(text: str):
        try:
            value = number_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if number_type is int else 'a number'}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return value

    return parse


def json_object(text: str) -> dict:
    """An argparse type for a JSON object, e.g. '{"layer": 3}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {error}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object like '{{\"layer\": 3}}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twigvlm",
        description=(
            "Answer a question about an image with TwigVLM: a LLaVA model whose twig (a few extra layers on an early "
            "layer) ranks the visual tokens, so that the deeper layers run on the most relevant ones only. Prints the "
            "answer and how many visual tokens each group of layers kept. Without --model it runs the small model "
            "trained in this repository on synthetic pictures of shapes, saved as a Hub-style folder and reloaded."
        ),
    )
    parser.add_argument(
        "--model",
        metavar="PATH_OR_REPO",
        help="TwigVLM checkpoint: a local folder or a Hub repo id, loaded with trust_remote_code=True. "
        f"Default: the small model trained here on the synthetic shapes task ({BUNDLED_MODEL_DIR.name}/ in the "
        "package), saved as a Hub-style folder first.",
    )
    parser.add_argument(
        "--save-dir",
        type=Path,
        help="Without --model: keep the small model's Hub-style folder here (default: a temporary folder, removed).",
    )
    parser.add_argument(
        "--image", type=Path, default=SAMPLE_IMAGE_PATH, help="Image file to ask about (default: the bundled sample)."
    )
    parser.add_argument(
        "--question", default=None, help=f"Question about the image (default: {default_question()!r})."
    )

    generation = parser.add_argument_group("generation")
    generation.add_argument(
        "--max-new-tokens", type=at_least(1), default=32, help="Most tokens to generate (default: 32)."
    )
    pruning = generation.add_mutually_exclusive_group()
    pruning.add_argument(
        "--visual-token-budget",
        type=at_least(0, float),
        metavar="R_BAR",
        help="Average visual tokens per layer (the paper's budget, e.g. 64, 128 or 192 for LLaVA-1.5); the model "
        "derives how many to keep after the twig. Default: the checkpoint's.",
    )
    pruning.add_argument(
        "--num-kept-visual-tokens",
        type=at_least(0),
        metavar="R",
        help="Visual tokens kept from the twig's layer up to the FinalWipe layer, set directly.",
    )
    pruning.add_argument(
        "--no-pruning", action="store_true", help="Keep every visual token in every layer (token_reduction='none')."
    )
    generation.add_argument(
        "--token-reduction",
        choices=list(TOKEN_REDUCTIONS),
        metavar="METHOD",
        help=f"How visual tokens are reduced: {', '.join(TOKEN_REDUCTIONS)}. twig is TwigVLM's pruning (the "
        "checkpoint's default); the others are the methods it is compared against, with the budget counted as each "
        "paper counts it (docs/token_reduction.md). They decode without self-speculative decoding.",
    )
    generation.add_argument(
        "--token-reduction-options",
        type=json_object,
        metavar="JSON",
        help='The method\'s own options as a JSON object, e.g. \'{"layer": 3}\' for fastv.',
    )
    generation.add_argument(
        "--no-speculative",
        action="store_true",
        help="Decode without self-speculative decoding (the twig drafting tokens that the full model verifies), "
        "which TwigVLM checkpoints switch on by default. The answer is the same either way.",
    )

    pictures = parser.add_argument_group("kept-token picture")
    pictures.add_argument(
        "--show-kept",
        type=Path,
        metavar="OUT.png",
        help="Also draw which image patches each token-reduction method keeps for this image and question, side by "
        "side at the chosen budget, and save the picture as PNG here.",
    )
    pictures.add_argument(
        "--show-kept-methods",
        metavar="NAMES",
        help=f"Comma-separated methods for --show-kept (from: {', '.join(TOKEN_REDUCTIONS)}). "
        "Default: every method but none.",
    )

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--dtype", choices=list(DTYPES), help="Weight dtype (default: bfloat16 on CUDA GPUs, float32 otherwise)."
    )
    runtime.add_argument(
        "--device",
        help="Where to run: cpu, cuda, cuda:1, mps, or auto to spread the model over the GPUs (device_map='auto'). "
        "Default: cuda when available, else cpu.",
    )
    runtime.add_argument(
        "--attn-implementation",
        choices=["eager", "sdpa", "flash_attention_2"],
        help="Attention kernel (default: transformers' choice, sdpa). flash_attention_2 needs the flash-attn package "
        "and a CUDA GPU.",
    )
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any loading, what cannot work, with a message that says why."""
    if args.save_dir is not None and args.model is not None:
        parser.error("--save-dir applies to the built-in small model only; --model is loaded from where it is")
    if args.model is not None and not Path(args.model).expanduser().exists():
        # A Hub repo id is "name" or "owner/name"; anything else was meant as a local folder.
        if args.model.startswith((".", "/", "~")) or args.model.count("/") > 1:
            parser.error(f"--model {args.model}: no such folder")
    if not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    if args.attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        parser.error("--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here")
    if args.show_kept_methods is not None:
        if args.show_kept is None:
            parser.error("--show-kept-methods chooses the methods of --show-kept OUT.png; give that too")
        unknown = [name for name in kept_picture_methods(args) if name not in TOKEN_REDUCTIONS]
        if unknown:
            parser.error(f"--show-kept-methods: unknown {', '.join(unknown)}; choose from {', '.join(TOKEN_REDUCTIONS)}")
    if args.no_pruning and args.token_reduction not in (None, "none"):
        parser.error(f"--no-pruning is token_reduction 'none'; it cannot go with --token-reduction {args.token_reduction}")
    if args.token_reduction_options is not None and args.token_reduction is None:
        parser.error("--token-reduction-options needs --token-reduction METHOD")
    if args.show_kept is not None and not args.show_kept.parent.is_dir():
        parser.error(f"--show-kept {args.show_kept}: no folder {args.show_kept.parent}")


def kept_picture_methods(args: argparse.Namespace) -> list[str] | None:
    """The methods --show-kept compares: those named, or (None) every one the model can run at the budget but none."""
    if args.show_kept_methods is None:
        return None
    return [name.strip() for name in args.show_kept_methods.split(",") if name.strip()]


def generate_kwargs(args: argparse.Namespace) -> dict:
    """The `generate` keyword arguments the options ask for; the rest are the checkpoint's generation defaults."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "return_dict_in_generate": True}
    if args.no_speculative:
        kwargs["speculative_decoding"] = False
    if args.token_reduction is not None:
        kwargs["token_reduction"] = args.token_reduction
        if args.token_reduction not in ("twig", "none"):  # drafting is TwigVLM's; the baselines decode plainly
            kwargs["speculative_decoding"] = False
    if args.token_reduction_options is not None:
        kwargs["token_reduction_options"] = args.token_reduction_options
    if args.no_pruning:
        kwargs["token_reduction"] = "none"
    elif args.visual_token_budget is not None:
        kwargs["visual_token_budget"] = args.visual_token_budget
    elif args.num_kept_visual_tokens is not None:
        kwargs["num_kept_visual_tokens"] = args.num_kept_visual_tokens
    return kwargs


def load(source: str, args: argparse.Namespace):
    """The model and processor of a checkpoint, as any transformers user loads them."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(
        source,
        trust_remote_code=True,
        dtype=dtype,
        device_map=device,
        attn_implementation=args.attn_implementation,
    ).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    return model, processor


def answer(model, processor, image: Image.Image, question: str, kwargs: dict):
    """
    Answer `question` greedily in the checkpoint's chat format, printing the answer as it is produced (accepted draft
    tokens in colour on a terminal); returns the cache, which holds the kept-token counts and the drafting figures.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device, dtype=model.dtype)
    print("Answer: ", end="", flush=True)
    with torch.inference_mode():
        outputs = model.generate(**inputs, **kwargs, streamer=DraftMarkingStreamer(processor.tokenizer))
    return output_cache(outputs)


def format_speculation_stats(stats) -> str:
    if stats is None:
        return "Self-speculative decoding: off"
    return (
        f"Self-speculative decoding: {stats.rounds} rounds, {stats.drafted_tokens} tokens drafted, "
        f"{stats.accepted_tokens} accepted ({stats.acceptance_rate:.0%}), "
        f"{stats.mean_accepted_length:.2f} accepted per round"
    )


def format_token_reduction(report) -> str:
    """The method, its settings and the visual tokens that entered the language model."""
    settings = ", ".join(f"{key}={value}" for key, value in report.settings.items() if value is not None)
    return (
        f"Token reduction: {report.method}" + (f" ({settings})" if settings else "")
        + f"; {report.visual_tokens_entering_llm[0]} visual tokens entered the language model"
    )


def format_visual_token_counts(counts: list[tuple[int, int, int]]) -> str:
    num_layers = counts[-1][1]
    average = sum((end - start) * num_visual for start, end, num_visual in counts) / num_layers
    lines = [f"Visual tokens per layer group ({counts[0][2]} in the prompt):"]
    lines += [f"  layers {start:>2}-{end - 1:<2}  {num_visual:>5}" for start, end, num_visual in counts]
    lines.append(f"  average over the {num_layers} layers: {average:g}")
    return "\n".join(lines)


def run(parser: argparse.ArgumentParser, source: str, args: argparse.Namespace, image: Image.Image, question: str):
    try:
        model, processor = load(source, args)
    except OSError as error:
        parser.error(f"cannot load {source}: {error}")
    print(f"Loaded {type(model).__name__} from {source} ({model.dtype}, {model.device}).", flush=True)
    print(f"Question: {question}")
    try:
        cache = answer(model, processor, image, question, generate_kwargs(args))
    except ValueError as error:  # what the model refuses, e.g. a budget this checkpoint cannot meet
        print()
        parser.error(str(error))
    print(format_token_reduction(cache.token_reduction_report))
    print(format_visual_token_counts(cache.visual_token_counts))
    print(format_speculation_stats(cache.speculation_stats), flush=True)
    if args.show_kept is not None:
        show_kept(
            model,
            processor,
            image,
            question,
            methods=kept_picture_methods(args),
            visual_token_budget=args.visual_token_budget,
            num_kept_visual_tokens=args.num_kept_visual_tokens,
            path=args.show_kept,
        )
        print(f"Kept-token picture: {args.show_kept}", flush=True)


def run_bundled_model(
    parser: argparse.ArgumentParser, folder: Path, args: argparse.Namespace, image: Image.Image, question: str
) -> None:
    """Save the bundled model as a Hub-style folder and run it from there, as a downloaded checkpoint runs."""
    save_bundled_model(folder)
    print(f"Saved the small model as a Hub-style folder: {folder}", flush=True)
    run(parser, str(folder), args, image, question)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        image = Image.open(args.image).convert("RGB")
    except UnidentifiedImageError:
        parser.error(f"--image {args.image}: not an image file PIL can read")
    question = args.question if args.question is not None else default_question()

    if args.model is not None:
        run(parser, args.model, args, image, question)
        return 0

    print(BUNDLED_MODEL_NOTE, flush=True)
    if args.save_dir is not None:
        run_bundled_model(parser, args.save_dir, args, image, question)
    else:
        with tempfile.TemporaryDirectory(prefix="twigvlm-small-") as temporary_dir:
            run_bundled_model(parser, Path(temporary_dir) / "twigvlm-small", args, image, question)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
