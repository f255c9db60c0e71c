"""The benchmark's result as markdown tables (every ratio against the LLaVA baseline) and PNG charts."""

from pathlib import Path


def _ratio(value: float, ratio: float, digits: int = 1) -> str:
    return f"{value:.{digits}f} ({ratio:.2f}×)"


def _acceptance(answer: dict) -> str:
    speculation = answer["speculation"]
    return "–" if speculation is None else f"{speculation['acceptance_rate']:.2f}"


def main_rows(run: dict) -> list[dict]:
    return [row for row in run["configurations"] if not row["sweep_only"]]


def sweep_rows(run: dict) -> list[dict]:
    """TTP + SSD at every target acceptance: the sweep's own rows and the main table's row at the paper's rate."""
    rows = [
        row
        for row in run["configurations"]
        if row["acceptance_target"] is not None and row["generate_kwargs"].get("token_reduction") == "twig"
    ]
    return sorted(rows, key=lambda row: row["acceptance_target"])


def header(result: dict) -> list[str]:
    meta, limits, weights = result["meta"], result["limits"], result["weights"]
    load = meta["load_average"]
    return [
        f"Device: {meta['device']}; dtype {meta['dtype']}; torch {meta['torch']}, transformers {meta['transformers']}; "
        f"size '{meta['size']}' ({meta['num_layers']} layers, K={meta['twig_attach_layer']}, "
        f"T={meta['num_twig_layers']}, F={meta['final_wipe_layer']}); prompt {meta['prompt_tokens']} tokens of which "
        f"{meta['image_tokens']} image tokens; answers of {', '.join(map(str, meta['answer_lengths']))} tokens "
        f"(EOS suppressed); medians of {meta['repeats']} interleaved repeats after a warm-up"
        + (f"; load average {load[0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end." if load else "."),
        f"Measured limits: matmul {limits['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, memory bandwidth "
        f"{limits['memory_bytes_per_s'] / 1e9:.1f} GB/s. Twig weights {weights['twig_bytes'] / 2**20:.1f} MiB = "
        f"+{100 * weights['twig_overhead']:.1f} % of the base's {weights['base_bytes'] / 2**20:.1f} MiB.",
    ]


def markdown(result: dict) -> str:
    lengths = [str(n) for n in result["meta"]["answer_lengths"]]
    long = lengths[-1]
    lines = header(result)
    for run in result["runs"]:
        lines += [
            "",
            f"### Attention: {run['attn_implementation']} (ratios against {main_rows(run)[0]['name']}: time for "
            "prefill, throughput for tokens/s, bytes for memory)",
            "",
            "| configuration | prompt tokens per layer group | prefill ms | vision ms | LLM prefill ms | "
            f"decode tok/s @{long} | "
            + " | ".join(f"e2e tok/s @{n}" for n in lengths)
            + f" | acceptance @{long} | peak MiB | prefill % of matmul limit | decode % of bandwidth @{long} |",
            "|---" * (10 + len(lengths)) + "|",
        ]
        for row in main_rows(run):
            ratios, answers = row["vs_baseline"], row["answers"]
            groups = " / ".join(str(tokens) for _, _, tokens in row["prompt_tokens_per_layer_group"])
            cells = [
                row["name"],
                groups,
                _ratio(1e3 * row["prefill_s"], ratios["prefill_s"]),
                f"{1e3 * row['vision_s']:.1f}",
                _ratio(1e3 * row["llm_prefill_s"], ratios["llm_prefill_s"]),
                _ratio(answers[long]["decode_tokens_per_s"], ratios[f"decode_tokens_per_s@{long}"]),
                *(_ratio(answers[n]["e2e_tokens_per_s"], ratios[f"e2e_tokens_per_s@{n}"]) for n in lengths),
                _acceptance(answers[long]),
                _ratio(row["peak_memory_bytes"] / 2**20, ratios["peak_memory_bytes"], 0),
                f"{100 * row['prefill_matmul_fraction']:.0f} %",
                f"{100 * answers[long]['decode_bandwidth_fraction']:.0f} %",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        sweep = sweep_rows(run)
        if sweep:
            length = str(result["meta"]["sweep_length"])
            lines += [
                "",
                f"Speed against measured acceptance ({sweep[0]['name'].split(',')[0]}, answers of {length} tokens):",
                "",
                "| target acceptance | twig head noise | measured acceptance | accepted drafts per round | "
                f"decode tok/s @{length} | e2e tok/s @{length} |",
                "|---|---|---|---|---|---|",
            ]
            for row in sweep:
                answer, ratios = row["answers"][length], row["vs_baseline"]
                speculation = answer["speculation"]
                lines.append(
                    f"| {row['acceptance_target']:g} | {row['twig_head_noise']:.3g} | "
                    f"{speculation['acceptance_rate']:.2f} | {speculation['accepted_per_round']:.2f} | "
                    f"{_ratio(answer['decode_tokens_per_s'], ratios[f'decode_tokens_per_s@{length}'])} | "
                    f"{_ratio(answer['e2e_tokens_per_s'], ratios[f'e2e_tokens_per_s@{length}'])} |"
                )
    return "\n".join(lines)


def plot(result: dict, directory: Path) -> list[Path]:
    """Two PNG charts per attention implementation: ratios per configuration, and speed against acceptance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    meta, written = result["meta"], []
    long, sweep_length = str(meta["answer_lengths"][-1]), str(meta["sweep_length"])
    title = f"{meta['size']} on {meta['device']}, {meta['dtype']}"
    for run in result["runs"]:
        attn = run["attn_implementation"]
        rows = main_rows(run)
        figure, axes = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
        series = {
            "prefill time": [row["vs_baseline"]["prefill_s"] for row in rows],
            f"decode tok/s @{long}": [row["vs_baseline"][f"decode_tokens_per_s@{long}"] for row in rows],
            f"e2e tok/s @{long}": [row["vs_baseline"][f"e2e_tokens_per_s@{long}"] for row in rows],
        }
        width = 0.8 / len(series)
        for offset, (label, values) in enumerate(series.items()):
            axes.bar([i + offset * width for i in range(len(rows))], values, width, label=label)
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_xticks([i + width for i in range(len(rows))], [row["name"] for row in rows], rotation=25, ha="right")
        axes.set_ylabel("ratio to LLaVA")
        axes.set_title(f"{title}, {attn}")
        axes.legend()
        figure.tight_layout()
        written.append(directory / f"configurations-{attn}.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)

        sweep = sweep_rows(run)
        if not sweep:
            continue
        figure, axes = plt.subplots(figsize=(6, 4.5))
        sweep.sort(key=lambda row: row["answers"][sweep_length]["speculation"]["acceptance_rate"])
        accepted = [row["answers"][sweep_length]["speculation"]["acceptance_rate"] for row in sweep]
        for key, label in (("e2e_tokens_per_s", "end-to-end"), ("decode_tokens_per_s", "decode")):
            ratios = [row["vs_baseline"][f"{key}@{sweep_length}"] for row in sweep]
            axes.plot(accepted, ratios, marker="o", label=f"{label} tokens/s")
        for row, x in zip(sweep, accepted):
            axes.annotate(f"target {row['acceptance_target']:g}", (x, 1.0), fontsize=7, rotation=90, va="bottom")
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_xlabel("measured acceptance rate")
        axes.set_ylabel(f"ratio to LLaVA, answers of {sweep_length} tokens")
        axes.set_title(f"TTP + SSD: {title}, {attn}", fontsize=9)
        axes.legend()
        figure.tight_layout()
        written.append(directory / f"speed-vs-acceptance-{attn}.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written
