"""
One command from nothing to the tables: the synthetic data, the base LLaVA trained from scratch, its twig trained with
`twigvlm-train`, the TwigVLM checkpoint (float16) and the paper's two tables at small scale.

    python -m twigvlm.synthetic_vqa --recipe cpu --output runs/synthetic-cpu
"""

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoProcessor

from twigvlm import TwigVLMForConditionalGeneration
from twigvlm.app.bundled_model import ship
from twigvlm.training.cli import main as train_twig_main

from .base_model import RECIPES, Recipe, train_base
from .data import write_split
from .questions import FAMILIES
from .tables import (
    PAPER_BUDGETS,
    accuracy_table,
    answer_all,
    family_accuracy,
    load_items,
    speculative_table,
    write_tables,
)
from .tokenizer import build_task_processor


# The families whose answers are a word or two: how well the model reads the picture, without the long description.
SHORT_FAMILIES = tuple(family for family in FAMILIES if family != "describe")


def train_twig(
    recipe: Recipe, base_dir: Path, records: Path, image_folder: Path, output_dir: Path, max_steps: int
) -> Path:
    """Grows the twig from base layers K..K+T-1 and trains it with the project's twig trainer; the full model's folder."""
    train_twig_main(
        [
            f"--model_name_or_path={base_dir}",
            f"--twig_attach_layer={recipe.twig_attach_layer}",
            f"--num_twig_layers={recipe.num_twig_layers}",
            f"--final_wipe_layer={recipe.final_wipe_layer}",
            f"--data_path={records}",
            f"--image_folder={image_folder}",
            f"--output_dir={output_dir}",
            f"--learning_rate={recipe.twig_learning_rate}",
            f"--num_train_epochs={recipe.twig_epochs}",
            f"--max_steps={max_steps}",
            f"--per_device_train_batch_size={recipe.batch_size}",
            f"--global_batch_size={recipe.batch_size}",
            "--bf16=False",
            "--save_strategy=no",
            "--save_full_model=True",
            "--logging_steps=20",
            "--report_to=none",
            "--dataloader_num_workers=0",
        ]
    )
    return output_dir / "twigvlm"


def finish_checkpoint(trained_dir: Path, output_dir: Path, recipe: Recipe) -> None:
    """The shipped checkpoint: float16 weights, the 128-of-576 share as default budget, the answer's tokens only."""
    model = TwigVLMForConditionalGeneration.from_pretrained(trained_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(trained_dir, trust_remote_code=True)
    model.config.visual_token_budget = PAPER_BUDGETS[128] * recipe.num_image_tokens
    tokenizer = processor.tokenizer
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "<pad>", processor.image_token]),
    )
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.float16).save_pretrained(staging)
    processor.save_pretrained(staging)
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)


def subset_accuracy(
    model,
    processor,
    folder: Path,
    seed: int,
    image_size: int,
    split: str = "test",
    scenes: int = 20,
    families: tuple[str, ...] = FAMILIES,
    settings: dict | None = None,
) -> float:
    """
    Accuracy on the split's first scenes, the questions of `families`, with `settings` for `generate` (by default the
    checkpoint's own: on the first 20 test scenes, the figure the suite guards).
    """
    write_split(folder, seed, split, scenes, image_size)
    processor.tokenizer.padding_side = "left"
    items = [item for item in load_items(folder, split, None) if item["family"] in families]
    answers, _ = answer_all(model, processor, items, folder, settings or {}, batch_size=scenes)
    return family_accuracy(items, answers)["all"]


def run(recipe: Recipe, output: Path, seed: int, eval_per_family: int | None, speed_prompts: int, max_steps: int) -> dict:
    """Every stage in order; a stage whose output exists is not run again (delete it to redo it)."""
    output.mkdir(parents=True, exist_ok=True)
    timings = {}
    data_dir, base_dir, twig_dir, model_dir = output / "data", output / "base", output / "twig", output / "model"
    continued_dir = output / "base_continued"

    def stage(name: str, done: bool, work) -> None:
        if done:
            print(f"[{name}] already done")
            return
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        work()
        timings[name] = time.perf_counter() - start
        print(f"[{name}] {timings[name]:.0f} s", flush=True)

    processor = build_task_processor(recipe.image_size, recipe.patch_size)
    stage(
        "data",
        (data_dir / "test.json").exists(),
        lambda: write_all_data(recipe, data_dir, seed),
    )
    stage(
        "base",
        (base_dir / "config.json").exists(),
        lambda: train_base(
            recipe, processor, data_dir / "train.json", data_dir, base_dir, recipe.base_learning_rate, None, max_steps
        ),
    )
    stage(
        "base_continued",
        (continued_dir / "config.json").exists(),
        lambda: train_base(
            recipe,
            processor,
            data_dir / "train_continued.json",
            data_dir,
            continued_dir,
            recipe.continued_learning_rate,
            base_dir,
            max_steps,
        ),
    )
    stage(
        "twig",
        (twig_dir / "twigvlm" / "config.json").exists(),
        lambda: train_twig(recipe, continued_dir, data_dir / "train_continued.json", data_dir, twig_dir, max_steps),
    )
    stage("checkpoint", (model_dir / "config.json").exists(), lambda: finish_checkpoint(twig_dir / "twigvlm", model_dir, recipe))
    model = TwigVLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    tables = {"recipe": recipe.name, "seed": seed, "threads": torch.get_num_threads()}
    tables["fixed_subset_accuracy"] = subset_accuracy(model, processor, output / "subset", seed, recipe.image_size)
    print(f"fixed test subset (first 20 test scenes, 100 questions): {tables['fixed_subset_accuracy']:.1f} %")
    tables["short_question_accuracy_by_split"] = {
        split: subset_accuracy(
            model,
            processor,
            output / "by_split",
            seed,
            recipe.image_size,
            split,
            scenes=40,
            families=SHORT_FAMILIES,
            settings={"token_reduction": "none"},
        )
        for split in ("train", "validation", "test")
    }
    print(f"short questions, first 40 scenes of each split: {tables['short_question_accuracy_by_split']}")
    tables["accuracy"] = accuracy_table(model, processor, data_dir, per_family=eval_per_family)
    if speed_prompts:
        tables["speculative"] = speculative_table(model, processor, data_dir, num_prompts=speed_prompts)
    previous = output / "tables.json"
    recorded = json.loads(previous.read_text()).get("stage_seconds", {}) if previous.exists() else {}
    tables["stage_seconds"] = {**recorded, **timings}
    write_tables(tables, output)
    print((output / "tables.md").read_text())
    return tables


def write_all_data(recipe: Recipe, data_dir: Path, seed: int) -> None:
    """The training scenes of both base phases, validation and test; images are written once per scene."""
    write_split(data_dir, seed, "train", recipe.train_scenes, recipe.image_size)
    write_split(
        data_dir,
        seed,
        "train",
        recipe.continued_scenes,
        recipe.image_size,
        first_scene=recipe.train_scenes,
        name="train_continued",
        describe_last=False,
    )
    write_split(data_dir, seed, "validation", max(20, recipe.train_scenes // 50), recipe.image_size)
    write_split(data_dir, seed, "test", max(10, recipe.train_scenes // 40), recipe.image_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m twigvlm.synthetic_vqa",
        description="Train a small TwigVLM on the synthetic visual-question task and measure the paper's tables on it.",
    )
    parser.add_argument("--recipe", choices=list(RECIPES), default="cpu")
    parser.add_argument("--output", type=Path, required=True, help="Folder for the data, models and tables.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-scenes", type=int, help="Training scenes (default: the recipe's).")
    parser.add_argument("--eval-per-family", type=int, help="Test questions per family (default: all).")
    parser.add_argument("--speed-prompts", type=int, default=20, help="Long-answer prompts timed (0: no speed table).")
    parser.add_argument("--max-steps", type=int, default=-1, help="Stop each training after this many steps.")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's).")
    parser.add_argument(
        "--ship", action="store_true", help="Make the trained checkpoint the `twigvlm` program's bundled model."
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = RECIPES[args.recipe]
    if args.train_scenes:
        recipe = replace(recipe, train_scenes=args.train_scenes)
    run(recipe, args.output, args.seed, args.eval_per_family, args.speed_prompts, args.max_steps)
    if args.ship:
        ship(args.output / "model")
        print(f"Shipped {args.output / 'model'} as the bundled model.")
