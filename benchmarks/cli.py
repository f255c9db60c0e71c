"""`twigvlm-bench`: TwigVLM against transformers' LLaVA, measured side by side on the same random weights."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from .harness import ACCEPTANCE_TARGETS, run
from .models import SIZES
from .report import markdown, plot


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="twigvlm-bench",
        description=(
            "Prefill, decode and end-to-end speed and peak memory of LLaVA (transformers), TwigVLM without pruning, "
            "TTP, TTP + SSD, SSD alone and every other token-reduction strategy, on one set of random weights whose "
            "draft acceptance is controlled. Prints markdown tables with ratios to LLaVA and writes a JSON file."
        ),
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        help="tiny: seconds on a CPU; small: minutes on a CPU (the default there); llava-1.5-7b: the real shapes (the default on a GPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on a CPU, bfloat16 on a GPU")
    parser.add_argument(
        "--attn",
        nargs="+",
        help="attention implementations to measure in turn; default: sdpa, plus flash_attention_2 on a GPU where flash-attn is installed",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default: the size's)")
    parser.add_argument("--lengths", type=int, nargs="+", help="answer lengths in tokens (default: the size's)")
    parser.add_argument("--acceptance", type=float, nargs="+", default=list(ACCEPTANCE_TARGETS), help="target acceptance rates of the TTP + SSD sweep")
    parser.add_argument("--calibration-steps", type=int, default=4, help="bisection steps tuning the twig head to each target acceptance")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", type=Path, help="where the JSON goes (default: twigvlm-bench-SIZE-DEVICE.json)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also write PNG charts into DIR")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    size = SIZES[args.size or ("small" if device.type == "cpu" else "llava-1.5-7b")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    attn = args.attn or ["sdpa"] + (
        ["flash_attention_2"] if device.type == "cuda" and importlib.util.find_spec("flash_attn") else []
    )
    result = run(
        size,
        device,
        dtype,
        attn,
        tuple(args.lengths or size.answer_lengths),
        args.repeats or size.repeats,
        tuple(args.acceptance),
        args.calibration_steps,
        log=lambda message: print(message, file=sys.stderr, flush=True),
        seed=args.seed,
    )
    json_path = args.json or Path(f"twigvlm-bench-{size.name}-{device.type}.json")
    json_path.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\nJSON: {json_path}", file=sys.stderr)
    if args.plot:
        for path in plot(result, args.plot):
            print(f"Chart: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
