"""
The paper's two tables at small scale, on a model trained on the synthetic task: accuracy kept under each
token-reduction method at three budgets, and self-speculative decoding's acceptance and speed on long answers.
"""

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from twigvlm import TwigVLMForConditionalGeneration, output_cache
from twigvlm.benchmarks.models import llava_with_same_base

from .questions import FAMILIES, is_correct


METHODS = ("twig", "fastv", "sparsevlm", "visionzip", "fastervlm", "illava", "mustdrop", "random", "pooling")
# LLaVA-1.5's budgets (of its 576 image tokens) and the share of the image tokens each is.
PAPER_BUDGETS = {192: 1 / 3, 128: 2 / 9, 64: 1 / 9}
# The published settings of the adaptive methods belong to a budget; the same share of tokens takes the same setting.
SPARSEVLM_SCALE_BIAS = {64: (0.8, 0.0), 128: (9.0, 6.0), 192: (13.5, 0.0)}
MUSTDROP_THRESHOLDS = {64: (0.011, 0.01), 128: (0.0012, 0.001), 192: (0.001, 0.001)}
SHORT_ANSWER_TOKENS, LONG_ANSWER_TOKENS = 8, 120


def scaled_layer(layer: int, num_layers: int, paper_layers: int = 32) -> int:
    """A layer of LLaVA-1.5-7B's 32 at the same depth fraction of a `num_layers`-layer model (at least layer 1)."""
    return max(1, round(layer * num_layers / paper_layers))


def method_settings(method: str, paper_budget: int, model: TwigVLMForConditionalGeneration) -> dict:
    """
    The `generate` keywords that run `method` at the share of image tokens of `paper_budget` on this model: the
    methods' LLaVA-1.5-7B layers moved to the same depth fraction, the encoder layers of iLLaVA to the same stage.
    """
    config = model.config
    num_layers = config.text_config.num_hidden_layers
    budget = PAPER_BUDGETS[paper_budget] * config.image_seq_length
    settings = {"token_reduction": method, "visual_token_budget": budget}

    def scaled(layers: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({scaled_layer(layer, num_layers) for layer in layers}))

    if method == "fastv":
        settings["token_reduction_options"] = {"layer": config.twig_attach_layer}
    elif method == "sparsevlm":
        scale, bias = SPARSEVLM_SCALE_BIAS[paper_budget]
        settings["token_reduction_options"] = {"layers": scaled((2, 6, 15, 19)), "scale": scale, "bias": bias}
    elif method == "illava":
        # LLaVA-1.5-7B's setting merges half the patches over CLIP layers 5-8 of 24; here over the layers up to the
        # feature layer's middle, in the same total.
        feature_layer = config.vision_config.num_hidden_layers + config.vision_feature_layer
        vit_layers = tuple(range(max(0, feature_layer // 2), feature_layer + 1))
        merges = config.image_seq_length // (2 * len(vit_layers))
        settings["token_reduction_options"] = {
            "vit_layers": vit_layers,
            "vit_merges": merges,
            "llm_layer": config.twig_attach_layer,
        }
    elif method == "mustdrop":
        global_threshold, individual_threshold = MUSTDROP_THRESHOLDS[paper_budget]
        settings["token_reduction_options"] = {
            "layers": scaled((2, 6, 10, 14)),
            "global_threshold": global_threshold,
            "individual_threshold": individual_threshold,
            # The released 3x3 windows, or 2x2 (the paper's wording) where 3 does not divide the patch grid.
            "window": 3 if int(config.image_seq_length**0.5) % 3 == 0 else 2,
        }
    elif method == "random":
        settings["token_reduction_options"] = {"seed": 0}
    return settings


def mean_visual_tokens(cache, num_layers: int, batch_size: int) -> list[float]:
    """R̄ of each sample: the visual tokens each base layer processed, averaged over the layers."""
    if cache.token_reduction_report is not None:
        return list(cache.token_reduction_report.mean_visual_tokens_per_layer)
    # TTP and no reduction keep the same count in every row; the cache lists it per group of layers.
    groups = cache.visual_token_counts
    return [sum((end - start) * kept for start, end, kept in groups) / num_layers] * batch_size


def load_items(folder: Path, split: str, limit: int | None) -> list[dict]:
    """The split's single questions, `limit` of each family (the first ones)."""
    items = json.loads((folder / f"{split}_questions.json").read_text())
    by_family = defaultdict(list)
    for item in items:
        by_family[item["family"]].append(item)
    return [item for family in FAMILIES for item in by_family[family][:limit]]


def prompts(processor: LlavaProcessor, items: list[dict]) -> list[str]:
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}],
            add_generation_prompt=True,
        )
        for item in items
    ]


@torch.inference_mode()
def answer_all(
    model: TwigVLMForConditionalGeneration,
    processor: LlavaProcessor,
    items: list[dict],
    folder: Path,
    settings: dict,
    batch_size: int,
) -> tuple[list[str], list[float]]:
    """Greedy answers to every item, in batches of one family (left padding), and the R̄ each prompt ran with."""
    answers, visual_tokens = [], []
    num_layers = model.config.text_config.num_hidden_layers
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        long = any(item["family"] == "describe" for item in batch)
        images = [Image.open(folder / item["image"]).convert("RGB") for item in batch]
        inputs = processor(images=images, text=prompts(processor, batch), padding=True, return_tensors="pt")
        output = model.generate(
            **inputs,
            **settings,
            max_new_tokens=LONG_ANSWER_TOKENS if long else SHORT_ANSWER_TOKENS,
            do_sample=False,
            speculative_decoding=False,
            return_dict_in_generate=True,
        )
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new_tokens, skip_special_tokens=True)
        visual_tokens += mean_visual_tokens(output_cache(output), num_layers, len(batch))
    return answers, visual_tokens


def family_accuracy(items: list[dict], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy (%) per question family and over all questions."""
    correct = defaultdict(list)
    for item, answer in zip(items, answers):
        correct[item["family"]].append(is_correct(answer, item["answer"]))
        correct["all"].append(correct[item["family"]][-1])
    return {family: 100.0 * sum(hits) / len(hits) for family, hits in correct.items()}


def accuracy_table(
    model: TwigVLMForConditionalGeneration,
    processor: LlavaProcessor,
    folder: Path,
    split: str = "test",
    per_family: int | None = None,
    batch_size: int = 16,
    log: Callable[[str], None] = print,
) -> dict:
    """Accuracy per family unpruned and under every method at the three budgets, with accuracy relative to unpruned."""
    items = load_items(folder, split, per_family)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    answers, _ = answer_all(model, processor, items, folder, {"token_reduction": "none"}, batch_size)
    unpruned = family_accuracy(items, answers)
    log(f"unpruned: {unpruned['all']:.1f} % over {len(items)} questions")
    rows = [{"method": "none", "paper_budget": None, "visual_tokens": model.config.image_seq_length, **unpruned}]
    for paper_budget in PAPER_BUDGETS:
        for method in METHODS:
            settings = method_settings(method, paper_budget, model)
            answers, visual_tokens = answer_all(model, processor, items, folder, settings, batch_size)
            accuracy = family_accuracy(items, answers)
            rows.append(
                {
                    "method": method,
                    "paper_budget": paper_budget,
                    "visual_tokens": sum(visual_tokens) / len(visual_tokens),
                    **accuracy,
                    "relative": 100.0 * accuracy["all"] / unpruned["all"] if unpruned["all"] else None,
                }
            )
            log(f"{method} at {paper_budget}: {accuracy['all']:.1f} % (R̄ {rows[-1]['visual_tokens']:.1f})")
    return {"split": split, "questions": len(items), "rows": rows}


def timed_generate(model, inputs: dict, settings: dict) -> tuple[float, int, object]:
    start = time.perf_counter()
    output = model.generate(**inputs, **settings, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    return seconds, output.sequences.shape[1] - inputs["input_ids"].shape[1], output


@torch.inference_mode()
def speculative_table(
    model: TwigVLMForConditionalGeneration,
    processor: LlavaProcessor,
    folder: Path,
    split: str = "test",
    num_prompts: int = 20,
    log: Callable[[str], None] = print,
) -> dict:
    """
    Long answers ("describe the image", all of `LONG_ANSWER_TOKENS` tokens: EOS is suppressed so that every
    configuration decodes as much) one prompt at a time: tokens/s of transformers' LLaVA on the same base weights,
    TwigVLM unpruned, SSD alone, TTP alone and TTP + SSD at the three budgets, measured in turns on every prompt;
    SSD's acceptance rate; and how many answers equal LLaVA's (greedy decoding must not change them).
    """
    items = [item for item in load_items(folder, split, None) if item["family"] == "describe"][:num_prompts]
    llava: LlavaForConditionalGeneration = llava_with_same_base(model)
    num_image_tokens = model.config.image_seq_length
    configurations = {"LLaVA (transformers)": (llava, {})}
    configurations["TwigVLM, no pruning"] = (model, {"token_reduction": "none", "speculative_decoding": False})
    configurations["SSD alone"] = (model, {"token_reduction": "none", "speculative_decoding": True})
    # Greedy answers that must not differ: each configuration's against the one it should equal.
    same_as = {"TwigVLM, no pruning": "LLaVA (transformers)", "SSD alone": "TwigVLM, no pruning"}
    for paper_budget, share in PAPER_BUDGETS.items():
        budget = {"token_reduction": "twig", "visual_token_budget": share * num_image_tokens}
        configurations[f"TTP {paper_budget}"] = (model, {**budget, "speculative_decoding": False})
        configurations[f"TTP {paper_budget} + SSD"] = (model, {**budget, "speculative_decoding": True})
        same_as[f"TTP {paper_budget} + SSD"] = f"TTP {paper_budget}"
    totals = {name: {"seconds": 0.0, "tokens": 0, "drafted": 0, "accepted": 0, "same": 0} for name in configurations}
    # Warm-up, then every configuration on every prompt in turn, so that drifts of the machine hit them alike.
    warm_inputs = processor(
        images=Image.open(folder / items[0]["image"]), text=prompts(processor, items[:1]), return_tensors="pt"
    )
    for runner, settings in configurations.values():
        runner.generate(**warm_inputs, **settings, max_new_tokens=8, do_sample=False)
    for item in items:
        inputs = processor(
            images=Image.open(folder / item["image"]), text=prompts(processor, [item]), return_tensors="pt"
        )
        sequences = {}
        for name, (runner, settings) in configurations.items():
            length = {"max_new_tokens": LONG_ANSWER_TOKENS, "min_new_tokens": LONG_ANSWER_TOKENS}  # EOS suppressed
            seconds, tokens, output = timed_generate(runner, inputs, {**settings, **length})
            total = totals[name]
            total["seconds"] += seconds
            total["tokens"] += tokens
            sequences[name] = output.sequences
            if name in same_as:
                total["same"] += int(torch.equal(output.sequences, sequences[same_as[name]]))
            stats = getattr(output_cache(output), "speculation_stats", None)
            if stats is not None:
                total["drafted"] += stats.drafted_tokens
                total["accepted"] += stats.accepted_tokens
    rows = []
    base_rate = totals["LLaVA (transformers)"]["tokens"] / totals["LLaVA (transformers)"]["seconds"]
    for name, total in totals.items():
        rate = total["tokens"] / total["seconds"]
        rows.append(
            {
                "configuration": name,
                "tokens_per_second": rate,
                "speedup": rate / base_rate,
                "acceptance_rate": total["accepted"] / total["drafted"] if total["drafted"] else None,
                "greedy_equal_to": same_as.get(name),
                "answers_equal": total["same"] if name in same_as else None,
            }
        )
        log(f"{name}: {rate:.1f} tokens/s ({rate / base_rate:.2f}x)")
    return {"split": split, "prompts": len(items), "max_new_tokens": LONG_ANSWER_TOKENS, "rows": rows}


def accuracy_markdown(table: dict) -> str:
    families = ["all", *FAMILIES]
    lines = [
        "| method | budget (of 576) | R̄ measured | " + " | ".join(families) + " | relative |",
        "|---|---|---|" + "---|" * (len(families) + 1),
    ]
    for row in table["rows"]:
        budget = "—" if row["paper_budget"] is None else str(row["paper_budget"])
        relative = "100.0" if row["method"] == "none" else "—" if row["relative"] is None else f"{row['relative']:.1f}"
        cells = " | ".join(f"{row.get(family, float('nan')):.1f}" for family in families)
        lines.append(f"| {row['method']} | {budget} | {row['visual_tokens']:.1f} | {cells} | {relative} % |")
    return "\n".join(lines)


def speculative_markdown(table: dict) -> str:
    lines = [
        "| configuration | tokens/s | vs LLaVA | SSD acceptance | answers equal to |",
        "|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        acceptance = "—" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.3f}"
        equal = "—"
        if row["greedy_equal_to"] is not None:
            equal = f"{row['greedy_equal_to']}: {row['answers_equal']}/{table['prompts']}"
        lines.append(
            f"| {row['configuration']} | {row['tokens_per_second']:.1f} | {row['speedup']:.2f}x | {acceptance} | "
            f"{equal} |"
        )
    return "\n".join(lines)


def write_tables(tables: dict, output_dir: str | os.PathLike) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "tables.json").write_text(json.dumps(tables, indent=1))
    markdown = ["## Accuracy under token reduction", "", accuracy_markdown(tables["accuracy"]), ""]
    if "speculative" in tables:
        markdown += ["## Self-speculative decoding on long answers", "", speculative_markdown(tables["speculative"])]
    (output_dir / "tables.md").write_text("\n".join(markdown) + "\n")
