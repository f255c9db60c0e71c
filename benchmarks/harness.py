"""
The measurement: configurations are rows of (model, generate kwargs), all run on one set of weights, one prompt and
one image, their repeats interleaved so that a change in the machine's load falls on every row alike.
"""

import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import transformers

from twigvlm import output_cache
from twigvlm.configuration_twigvlm import TOKEN_REDUCTIONS
from twigvlm.token_reduction_twigvlm import supported_token_reductions

from . import costs
from .device import describe, measure_limits, peak_memory, timed
from .models import (
    Size,
    benchmark_inputs,
    build_twigvlm,
    llava_with_same_base,
    parameter_bytes,
    set_twig_head_noise,
)


PAPER_ACCEPTANCE = 0.574  # TwigVLM's token acceptance rate on MM-Vet at R̄ 64 (T = 3)
ACCEPTANCE_TARGETS = (0.3, PAPER_ACCEPTANCE, 0.8, 0.95)
BASELINE = "LLaVA (transformers)"


@dataclass(frozen=True)
class Configuration:
    """
    One row: which model answers ("llava" or "twigvlm") and the kwargs its `generate` gets on top of the common ones.
    With `acceptance_target` the twig's head is first perturbed until self-speculative decoding accepts that share of
    drafts; `lengths` limits the row to some answer lengths (None: all).
    """

    name: str
    model: str
    generate_kwargs: dict = field(default_factory=dict)
    acceptance_target: float | None = None
    lengths: tuple[int, ...] | None = None


def default_configurations(
    budgets: tuple[float, ...], acceptance_targets: tuple[float, ...], sweep_length: int, strategies: list[str]
) -> list[Configuration]:
    """
    The baseline, TwigVLM unpruned, TTP at each budget, TTP + SSD and SSD alone at the paper's acceptance, the other
    token-reduction `strategies` at the smallest budget, and TTP + SSD at each target acceptance (the
    speed-against-acceptance sweep, at one answer length).
    """
    budget = budgets[-1]
    plain = {"speculative_decoding": False}
    ssd = {"speculative_decoding": True}
    rows = [
        Configuration(BASELINE, "llava"),
        Configuration("TwigVLM, no pruning", "twigvlm", {**plain, "token_reduction": "none"}),
        *(
            Configuration(f"TTP R̄={b:g}", "twigvlm", {**plain, "token_reduction": "twig", "visual_token_budget": b})
            for b in budgets
        ),
        Configuration(
            f"TTP R̄={budget:g} + SSD",
            "twigvlm",
            {**ssd, "token_reduction": "twig", "visual_token_budget": budget},
            PAPER_ACCEPTANCE,
        ),
        Configuration("SSD alone", "twigvlm", {**ssd, "token_reduction": "none"}, PAPER_ACCEPTANCE),
        *(
            Configuration(f"{name} R̄={budget:g}", "twigvlm", {**plain, "token_reduction": name, "visual_token_budget": budget})
            for name in strategies
            if name not in ("twig", "none")
        ),
    ]
    sweep = [
        Configuration(
            f"TTP R̄={budget:g} + SSD, acceptance {target:g}",
            "twigvlm",
            {**ssd, "token_reduction": "twig", "visual_token_budget": budget},
            target,
            (sweep_length,),
        )
        for target in acceptance_targets
        if target != PAPER_ACCEPTANCE
    ]
    return rows + sweep


def speculation_of(output) -> costs.Speculation | None:
    """What self-speculative decoding did in one `generate` (None without it); TwigVLM keeps it on its cache."""
    stats = getattr(output_cache(output), "speculation_stats", None)
    if stats is None:
        return None
    return costs.Speculation(stats.rounds, stats.drafted_tokens, stats.accepted_tokens)


def token_groups(output, model_name: str, num_layers: int, prompt_length: int, num_image_tokens: int) -> list[tuple[int, int, int]]:
    """`(first layer, end layer, prompt tokens held)` per layer group, as the prefill left them."""
    counts = getattr(output_cache(output), "visual_token_counts", None)
    if model_name == "llava" or not counts:
        return [(0, num_layers, prompt_length)]
    text = prompt_length - num_image_tokens
    return [(first, end, text + visual) for first, end, visual in counts]


class Benchmark:
    """Builds the models once and measures configurations on them."""

    def __init__(self, size: Size, device: torch.device, dtype: torch.dtype, attn_implementation: str, seed: int = 0):
        self.size, self.device, self.dtype = size, device, dtype
        self.twigvlm = build_twigvlm(size, device, dtype, attn_implementation, seed)
        self.llava = llava_with_same_base(self.twigvlm)
        self.models = {"llava": self.llava, "twigvlm": self.twigvlm}
        self.inputs = benchmark_inputs(size, self.twigvlm, seed)
        self.prompt_length = self.inputs["input_ids"].shape[1]
        self.shapes = costs.Shapes.from_config(self.twigvlm.config, torch.empty((), dtype=dtype).element_size())
        self.head_noise: dict[str, float] = {}  # per configuration name
        text_config = self.twigvlm.config.text_config
        self.common = {
            "do_sample": False,
            "pad_token_id": text_config.pad_token_id,
            "eos_token_id": text_config.eos_token_id,
            "return_dict_in_generate": True,
        }

    def set_attn_implementation(self, attn_implementation: str) -> None:
        for model in self.models.values():
            model.set_attn_implementation(attn_implementation)

    def prepare(self, configuration: Configuration) -> None:
        """Give the twig the head this row was calibrated to; done outside the timed region."""
        if configuration.acceptance_target is not None:
            set_twig_head_noise(self.twigvlm, self.head_noise[configuration.name])

    def generate(self, configuration: Configuration, length: int):
        """A greedy answer of exactly `length` tokens (EOS suppressed by `min_new_tokens`)."""
        model = self.models[configuration.model]
        kwargs = {**self.common, **configuration.generate_kwargs, "max_new_tokens": length, "min_new_tokens": length}
        with torch.inference_mode():
            output = model.generate(**self.inputs, **kwargs)
        if output.sequences.shape[1] != self.prompt_length + length:
            raise RuntimeError(f"{configuration.name}: asked for {length} new tokens, got {output.sequences.shape[1] - self.prompt_length}.")
        return output

    def acceptance(self, configuration: Configuration, noise: float, length: int) -> float:
        self.head_noise[configuration.name] = noise
        self.prepare(configuration)
        speculation = speculation_of(self.generate(configuration, length))
        return speculation.accepted / speculation.drafted if speculation.drafted else 0.0

    def calibrate(self, configuration: Configuration, steps: int, log: Callable[[str], None]) -> None:
        """
        The twig-head noise that brings acceptance nearest `acceptance_target`, by bisection on a log scale. Acceptance
        falls as the noise grows; where even no noise accepts less than the target, no noise is used.
        """
        target, length = configuration.acceptance_target, self.size.calibration_length
        tried = {0.0: self.acceptance(configuration, 0.0, length)}
        low, high = 0.0, 0.05
        if tried[0.0] > target:
            while (accepted := self.acceptance(configuration, high, length)) > target and high < 10:
                tried[high] = accepted
                low, high = high, high * 2
            tried[high] = accepted
            for _ in range(steps):
                middle = (low + high) / 2 if low == 0 else (low * high) ** 0.5
                tried[middle] = self.acceptance(configuration, middle, length)
                low, high = (middle, high) if tried[middle] > target else (low, middle)
        noise = min(tried, key=lambda n: abs(tried[n] - target))
        self.head_noise[configuration.name] = noise
        log(f"  {configuration.name}: twig head noise {noise:.4g} -> acceptance {tried[noise]:.3f} (target {target:g})")

    def vision_seconds(self, configuration: Configuration) -> float:
        model = self.models[configuration.model]
        with torch.inference_mode():
            return timed(lambda: model.model.get_image_features(pixel_values=self.inputs["pixel_values"]), self.device)[0]


def run(
    size: Size,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementations: list[str],
    lengths: tuple[int, ...],
    repeats: int,
    acceptance_targets: tuple[float, ...] = ACCEPTANCE_TARGETS,
    calibration_steps: int = 4,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> dict:
    """Everything the report shows, as one JSON-ready dict: one entry of `runs` per attention implementation."""
    log(f"Measuring the device's limits ({device}, {dtype}) ...")
    limits = measure_limits(device, dtype)
    benchmark = Benchmark(size, device, dtype, attn_implementations[0], seed)
    sweep_length = lengths[1] if len(lengths) > 1 else lengths[-1]
    # The other strategies that run on this size at the smallest budget with their published settings.
    strategies = supported_token_reductions(benchmark.twigvlm.config, size.budgets[-1])
    configurations = default_configurations(size.budgets, acceptance_targets, sweep_length, strategies)
    base_bytes = parameter_bytes(benchmark.llava)
    twig_bytes = parameter_bytes(benchmark.twigvlm.model.twig)
    result = {
        "meta": {
            **describe(device),
            "size": size.name,
            "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "prompt_tokens": benchmark.prompt_length,
            "image_tokens": size.num_image_tokens,
            "num_layers": benchmark.shapes.num_layers,
            "twig_attach_layer": benchmark.shapes.attach_layer,
            "num_twig_layers": benchmark.shapes.num_twig_layers,
            "final_wipe_layer": benchmark.twigvlm.config.final_wipe_layer,
            "answer_lengths": list(lengths),
            "sweep_length": sweep_length,
            "repeats": repeats,
            "token_reductions": list(TOKEN_REDUCTIONS),
        },
        "limits": limits,
        "weights": {"base_bytes": base_bytes, "twig_bytes": twig_bytes, "twig_overhead": twig_bytes / base_bytes},
        "runs": [],
    }
    for attn_implementation in attn_implementations:
        benchmark.set_attn_implementation(attn_implementation)
        log(f"[{attn_implementation}] calibrating the twig head to target acceptance rates ...")
        for configuration in configurations:
            if configuration.acceptance_target is not None:
                benchmark.calibrate(configuration, calibration_steps, log)
        rows = measure(benchmark, configurations, lengths, repeats, limits, log)
        result["runs"].append({"attn_implementation": attn_implementation, "configurations": rows})
    result["meta"]["load_average_end"] = describe(device)["load_average"]
    return result


def measure(
    benchmark: Benchmark,
    configurations: list[Configuration],
    lengths: tuple[int, ...],
    repeats: int,
    limits: dict,
    log: Callable[[str], None],
) -> list[dict]:
    """
    Warm-up, then `repeats` interleaved rounds over all rows; medians and ratios. Peak memory is taken in the last
    round, around the longest answer (resetting the peak costs nothing inside the timed region).
    """
    device = benchmark.device
    row_lengths = {c.name: c.lengths or lengths for c in configurations}
    samples = {c.name: {"vision": [], "prefill": [], **{n: [] for n in row_lengths[c.name]}} for c in configurations}
    outputs: dict[str, dict] = {c.name: {} for c in configurations}
    memory: dict[str, dict] = {}
    log("Warming up ...")
    for configuration in configurations:
        benchmark.prepare(configuration)
        benchmark.vision_seconds(configuration)
        benchmark.generate(configuration, min(row_lengths[configuration.name]))
    for repeat in range(repeats):
        log(f"Round {repeat + 1}/{repeats} ...")
        for configuration in configurations:
            name, sample = configuration.name, samples[configuration.name]
            benchmark.prepare(configuration)
            sample["vision"].append(benchmark.vision_seconds(configuration))
            sample["prefill"].append(timed(lambda: benchmark.generate(configuration, 1), device)[0])
            for length in row_lengths[name]:
                watch_memory = repeat == repeats - 1 and length == max(row_lengths[name])
                with peak_memory(device) if watch_memory else nullcontext() as memory_now:
                    seconds, outputs[name][length] = timed(lambda: benchmark.generate(configuration, length), device)
                sample[length].append(seconds)
                if watch_memory:
                    memory[name] = memory_now
    rows = []
    for configuration in configurations:
        row = summarise(benchmark, configuration, samples[configuration.name], outputs[configuration.name], limits)
        weight_bytes = parameter_bytes(benchmark.models[configuration.model])
        row["weight_bytes"] = weight_bytes
        row["peak_above_weights_bytes"] = memory[configuration.name]["peak_bytes"] - memory[configuration.name]["baseline_bytes"]
        row["peak_memory_bytes"] = weight_bytes + row["peak_above_weights_bytes"]
        rows.append(row)
    add_ratios(rows)
    return rows


def summarise(benchmark: Benchmark, configuration: Configuration, sample: dict, outputs: dict, limits: dict) -> dict:
    """Medians, the analytic costs of what ran, and how near each time comes to the device's limits."""
    shapes = benchmark.shapes
    prefill_s, vision_s = statistics.median(sample["prefill"]), statistics.median(sample["vision"])
    groups = token_groups(
        next(iter(outputs.values())),
        configuration.model,
        shapes.num_layers,
        benchmark.prompt_length,
        shapes.num_image_tokens,
    )
    reduction = configuration.generate_kwargs.get("token_reduction")
    speculative = bool(configuration.generate_kwargs.get("speculative_decoding"))
    on_twigvlm = configuration.model == "twigvlm"
    prefill_cost = costs.prefill(
        shapes, groups, twig_runs=on_twigvlm and (reduction == "twig" or speculative), twig_scores=on_twigvlm and reduction == "twig"
    )
    answers = {}
    for length, output in outputs.items():
        e2e_s = statistics.median(sample[length])
        speculation = speculation_of(output)
        decode_cost = costs.decode_per_token(shapes, groups, length, speculation)
        decode_s_per_token = (e2e_s - prefill_s) / (length - 1) if length > 1 else None
        answers[str(length)] = {
            "e2e_s": e2e_s,
            "e2e_tokens_per_s": length / e2e_s,
            "decode_tokens_per_s": 1 / decode_s_per_token if decode_s_per_token else None,
            "decode_flops_per_token": decode_cost.flops,
            "decode_bytes_per_token": decode_cost.bytes,
            "decode_bandwidth_fraction": (
                decode_cost.bytes / limits["memory_bytes_per_s"] / decode_s_per_token if decode_s_per_token else None
            ),
            "speculation": None if speculation is None else {
                "rounds": speculation.rounds,
                "drafted": speculation.drafted,
                "accepted": speculation.accepted,
                "acceptance_rate": speculation.accepted / speculation.drafted if speculation.drafted else 0.0,
                "accepted_per_round": speculation.accepted / speculation.rounds if speculation.rounds else 0.0,
            },
            "samples_s": sample[length],
        }
    return {
        "name": configuration.name,
        "model": configuration.model,
        "generate_kwargs": configuration.generate_kwargs,
        "acceptance_target": configuration.acceptance_target,
        "sweep_only": configuration.lengths is not None,
        "twig_head_noise": benchmark.head_noise.get(configuration.name),
        "prompt_tokens_per_layer_group": [list(group) for group in groups],
        "vision_s": vision_s,
        "prefill_s": prefill_s,
        "llm_prefill_s": prefill_s - vision_s,
        "prefill_flops": prefill_cost.flops,
        "prefill_bytes": prefill_cost.bytes,
        "prefill_matmul_fraction": prefill_cost.flops / limits["matmul_flops_per_s"] / prefill_s,
        "answers": answers,
        "samples_prefill_s": sample["prefill"],
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row against the LLaVA baseline: time ratios for prefill, throughput ratios for tokens/s, memory ratio."""
    baseline = next(row for row in rows if row["name"] == BASELINE)
    for row in rows:
        ratios = {
            "prefill_s": row["prefill_s"] / baseline["prefill_s"],
            "llm_prefill_s": row["llm_prefill_s"] / baseline["llm_prefill_s"],
            "peak_memory_bytes": row["peak_memory_bytes"] / baseline["peak_memory_bytes"],
        }
        for length, answer in row["answers"].items():
            base = baseline["answers"][length]
            ratios[f"e2e_tokens_per_s@{length}"] = answer["e2e_tokens_per_s"] / base["e2e_tokens_per_s"]
            if answer["decode_tokens_per_s"]:
                ratios[f"decode_tokens_per_s@{length}"] = answer["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["vs_baseline"] = ratios
