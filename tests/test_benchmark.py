"""The speed benchmark's harness: it runs end to end, counts costs as a hand count does, and controls acceptance."""

import importlib.util
import json

import pytest
import torch

from twigvlm import output_cache
from twigvlm.benchmarks import costs
from twigvlm.benchmarks.cli import main
from twigvlm.benchmarks.harness import BASELINE
from twigvlm.benchmarks.models import (
    SIZES,
    benchmark_inputs,
    build_twigvlm,
    llava_with_same_base,
    set_twig_head_noise,
    twigvlm_config,
)
from twigvlm.token_reduction_twigvlm import supported_token_reductions


ROW_FIELDS = {
    "name", "model", "generate_kwargs", "acceptance_target", "sweep_only", "twig_head_noise",
    "prompt_tokens_per_layer_group", "vision_s", "prefill_s", "llm_prefill_s", "prefill_flops", "prefill_bytes",
    "prefill_matmul_fraction", "answers", "samples_prefill_s", "weight_bytes", "peak_above_weights_bytes",
    "peak_memory_bytes", "vs_baseline",
}  # fmt: skip
ANSWER_FIELDS = {
    "e2e_s", "e2e_tokens_per_s", "decode_tokens_per_s", "decode_flops_per_token", "decode_bytes_per_token",
    "decode_bandwidth_fraction", "speculation", "samples_s",
}  # fmt: skip
META_FIELDS = {
    "device", "device_type", "dtype", "torch", "transformers", "threads", "size", "prompt_tokens", "image_tokens",
    "answer_lengths", "sweep_length", "repeats", "load_average", "load_average_end", "token_reductions",
}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_on_the_tiny_size_writes_every_field(tmp_path, capsys):
    plots = importlib.util.find_spec("matplotlib") is not None
    argv = ["--size", "tiny", "--device", "cpu", "--lengths", "2", "4", "--acceptance", "0.5", "--calibration-steps", "1"]
    argv += ["--json", str(tmp_path / "out.json")]
    main(argv + (["--plot", str(tmp_path / "charts")] if plots else []))
    result = json.loads((tmp_path / "out.json").read_text())

    assert META_FIELDS <= result["meta"].keys()
    assert {"matmul_flops_per_s", "memory_bytes_per_s"} <= result["limits"].keys()
    assert result["weights"]["twig_bytes"] > 0 and result["weights"]["twig_overhead"] > 0
    (run,) = result["runs"]
    assert run["attn_implementation"] == "sdpa"
    rows = {row["name"]: row for row in run["configurations"]}
    size = SIZES["tiny"]
    supported = supported_token_reductions(twigvlm_config(size), size.budgets[-1])
    strategies = [name for name in supported if name not in ("twig", "none")]
    # baseline, unpruned, 3 budgets, TTP + SSD, SSD alone, each other strategy, one sweep point
    assert len(rows) == 7 + len(strategies) + 1
    for row in rows.values():
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["answers"].keys() == ({"4"} if row["sweep_only"] else {"2", "4"})
        for answer in row["answers"].values():
            assert ANSWER_FIELDS <= answer.keys()
        assert (row["answers"]["4"]["speculation"] is not None) == bool(row["generate_kwargs"].get("speculative_decoding"))
    assert rows[BASELINE]["vs_baseline"]["prefill_s"] == 1.0
    assert rows["SSD alone"]["twig_head_noise"] is not None

    table = capsys.readouterr().out
    assert all(name in table for name, row in rows.items() if not row["sweep_only"])
    assert "| 0.5 |" in table  # the sweep's row
    if plots:
        assert {path.name for path in (tmp_path / "charts").iterdir()} == {"configurations-sdpa.png", "speed-vs-acceptance-sdpa.png"}


def test_costs_equal_a_hand_count_on_the_tiny_size():
    shapes = costs.Shapes.from_config(twigvlm_config(SIZES["tiny"]), element_bytes=4)
    # text: hidden 64, MLP 128, 4 heads of 16, 2 KV heads, vocabulary 512, 8 layers; vision: 32 wide, MLP 64,
    # 2 layers, 16 patches of 14×14 (+ a class token); prompt of 24 tokens.
    layer_linear = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
    layer_weights = layer_linear + 2 * 64
    vision_weights = 3 * 14 * 14 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 64) + (32 * 64 + 64 * 64)
    vision_flops = (
        2 * 16 * 3 * 14 * 14 * 32
        + 2 * (2 * 17 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 32 * 17 * 17)
        + 2 * 16 * (32 * 64 + 64 * 64)
    )

    def layer_prefill_flops(tokens: int) -> int:
        return 2 * tokens * layer_linear + 4 * 64 * tokens * (tokens + 1) // 2

    llava = costs.prefill(shapes, [(0, 8, 24)], twig_runs=False, twig_scores=False)
    assert llava.flops == vision_flops + 8 * layer_prefill_flops(24) + 2 * 64 * 512
    assert llava.bytes == 4 * (vision_weights + 8 * layer_weights + 64 * 512 + 8 * 2 * 32 * 24)

    # TTP keeping 4 of 16 image tokens for layers 2..5, none from layer 6; the twig's 2 layers run on all 24 tokens
    # and its last layer scores one query row (a q projection and 24 dot products per head).
    ttp = costs.prefill(shapes, [(0, 2, 24), (2, 6, 12), (6, 8, 8)], twig_runs=True, twig_scores=True)
    expected = (
        vision_flops
        + 2 * layer_prefill_flops(24)
        + 4 * layer_prefill_flops(12)
        + 2 * layer_prefill_flops(8)
        + 2 * layer_prefill_flops(24)
        + (2 * 64 * 64 + 2 * 64 * 24)
        + 2 * 64 * 512
    )
    assert ttp.flops == expected

    # Plain decoding of a 5-token answer: tokens 2..5 are decoded one step each, after 24, 25, 26, 27 cached tokens.
    steps = [8 * (2 * layer_linear + 4 * 64 * (past + 1)) + 2 * 64 * 512 for past in range(24, 28)]
    step_bytes = [4 * (8 * (layer_weights + 2 * 32 * (past + 1)) + 64 * 512) for past in range(24, 28)]
    decode = costs.decode_per_token(shapes, [(0, 8, 24)], answer_length=5)
    assert decode.flops == pytest.approx(sum(steps) / 4)
    assert decode.bytes == pytest.approx(sum(step_bytes) / 4)


def test_unperturbed_twig_drafts_the_full_models_greedy_prediction():
    size = SIZES["tiny"]
    model = build_twigvlm(size, torch.device("cpu"), torch.float32, "sdpa")
    inputs = benchmark_inputs(size, model)
    greedy = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, token_reduction="none")
    with torch.no_grad():
        answer = model.generate(**inputs, speculative_decoding=False, **greedy)
        full = model(input_ids=answer, pixel_values=inputs["pixel_values"], token_reduction="none").logits
        draft = model.twig_forward(input_ids=answer, pixel_values=inputs["pixel_values"]).logits
    prompt_length = inputs["input_ids"].shape[1]
    predictions = slice(prompt_length - 1, answer.shape[1] - 1)
    assert torch.equal(draft[0, predictions].argmax(-1), full[0, predictions].argmax(-1))
    assert torch.equal(full[0, predictions].argmax(-1), answer[0, prompt_length:])

    # Self-speculative decoding accepts every draft, and noise on the twig's head lowers acceptance.
    with torch.no_grad():
        accepted = model.generate(**inputs, speculative_decoding=True, return_dict_in_generate=True, **greedy)
        set_twig_head_noise(model, 1.0)
        perturbed = model.generate(**inputs, speculative_decoding=True, return_dict_in_generate=True, **greedy)
    assert torch.equal(accepted.sequences, answer) and torch.equal(perturbed.sequences, answer)
    assert output_cache(accepted).speculation_stats.acceptance_rate == 1.0
    assert output_cache(perturbed).speculation_stats.acceptance_rate < 0.5


def test_llava_baseline_holds_the_same_tensors_and_answers_alike():
    size = SIZES["tiny"]
    model = build_twigvlm(size, torch.device("cpu"), torch.float32, "sdpa")
    llava = llava_with_same_base(model)
    assert llava.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    inputs = benchmark_inputs(size, model)
    with torch.no_grad():
        ours = model(**inputs, token_reduction="none").logits
        theirs = llava(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
