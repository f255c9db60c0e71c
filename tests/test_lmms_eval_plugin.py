"""The lmms-eval model plugin: found by name, runs a local task end to end, answers as model.generate does."""

import glob
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image, ImageDraw

from tiny_processor import save_tiny_checkpoint


lmms_eval_models = pytest.importorskip("lmms_eval.models", reason="lmms-eval is not installed (pip install -e .[test])")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from twigvlm.evaluation import TASKS_DIR  # noqa: E402
from twigvlm.evaluation.prompting import chat_inputs  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASK, SPLIT = "local", "test"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_twigvlm")
    save_tiny_checkpoint(path)
    return str(path)


def picture(seed: int) -> Image.Image:
    """A wide picture of a few coloured boxes, so that images differ and pad-to-square has work to do."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (90, 60), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = torch.randint(0, 70, (1,), generator=generator).item(), torch.randint(0, 40, (1,), generator=generator).item()
        color = tuple(torch.randint(0, 256, (3,), generator=generator).tolist())
        draw.rectangle((x, y, x + 20, y + 20), fill=color)
    return image


DOCS = [
    {"question": "What is in the picture?", "image": picture(0)},
    {"question": "Which colour is the box on the left?", "image": picture(1)},
    {"question": "Say something without a picture.", "image": None},  # batched apart: no image tokens to prune
    {"question": "Is there a red box?", "image": picture(2)},
]


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [] if doc["image"] is None else [doc["image"]]


def plugin(checkpoint: str, **model_args):
    """The model class as lmms-eval resolves it by name, holding our documents as lmms-eval's task_dict would."""
    model_class = lmms_eval_models.get_model("twigvlm")
    model = model_class(pretrained=checkpoint, dtype="float32", device="cpu", **model_args)
    model.task_dict = {TASK: {SPLIT: DOCS}}
    return model


def generation_request(doc_id: int, gen_kwargs: dict) -> Instance:
    arguments = (DOCS[doc_id]["question"], dict(gen_kwargs), doc_to_visual, doc_id, TASK, SPLIT)
    return Instance("generate_until", arguments, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def reference_answer(model, doc_id: int, max_new_tokens: int):
    """What model.generate answers alone for the same prompt and image: plain greedy decoding, no drafting."""
    inputs = chat_inputs(model.processor, [DOCS[doc_id]["question"]], [doc_to_visual(DOCS[doc_id])], "cpu", torch.float32)
    output = model.model.generate(
        **inputs,
        **model.generation_options,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        speculative_decoding=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new_tokens = output.sequences[0, inputs["input_ids"].shape[1] :]
    return model.tokenizer.decode(new_tokens, skip_special_tokens=True), output.scores


def test_entry_point_is_discovered_by_name():
    names = [entry_point.name for entry_point in entry_points(group="lmms_eval.models")]
    assert "twigvlm" in names
    manifest = lmms_eval_models.get_model_manifest("twigvlm")
    assert manifest.simple_class_path == "twigvlm.evaluation.lmms_eval_model.TwigVLM"
    model_class = lmms_eval_models.get_model("twigvlm")
    assert issubclass(model_class, lmms) and model_class.is_simple


@pytest.mark.parametrize(
    "model_args",
    [
        dict(speculative=True, visual_token_budget=8, token_reduction="twig"),
        dict(speculative=False, batch_size=2, num_kept_visual_tokens=3, token_reduction="twig"),
        dict(token_reduction="none", batch_size=4),
    ],
    ids=["ssd-batch1", "no-ssd-batch2", "no-pruning-batch4"],
)
def test_generation_requests_answer_as_model_generate(checkpoint, model_args):
    model = plugin(checkpoint, **model_args)
    expected = [reference_answer(model, doc_id, max_new_tokens=7)[0] for doc_id in range(len(DOCS))]
    # A stop string from inside the first answer, so that cutting at stop strings is exercised too.
    stop = expected[0][3:5]
    assert stop, f"the first answer is too short to cut: {expected[0]!r}"
    gen_kwargs = {"max_new_tokens": 7, "until": [stop], "temperature": 0, "do_sample": False}
    results = model.generate_until([generation_request(doc_id, gen_kwargs) for doc_id in range(len(DOCS))])
    assert [result.text for result in results] == [text.split(stop)[0] for text in expected]

    counts = [result.token_counts.to_dict() for result in results]
    assert counts[2]["visual_tokens"] == 0 and all(n == 0 for _, _, n in counts[2]["kept_visual_tokens"])
    del counts[2]  # the text-only document
    num_layers = model.model.config.text_config.num_hidden_layers
    for record in counts:
        groups = record["kept_visual_tokens"]
        assert groups[0] == [0, 2, 16] and record["visual_tokens"] == 16
        assert record["mean_visual_tokens_per_layer"] == sum((end - start) * n for start, end, n in groups) / num_layers
        assert record["speculative"] is model.speculative
        assert ("acceptance_rate" in record) is model.speculative
        assert 0 < record["output_tokens"] <= 7 and record["input_tokens"] > 16
    if model_args.get("token_reduction") == "none":
        assert all(n == 16 for record in counts for _, _, n in record["kept_visual_tokens"])
    else:
        assert counts[0]["kept_visual_tokens"][1][2] == model_args.get("num_kept_visual_tokens", 8)
    if model.speculative:
        assert counts[0]["drafted_tokens"] >= counts[0]["accepted_tokens"] >= 0 and counts[0]["draft_rounds"] > 0


def test_speculative_decoding_needs_batch_size_one(checkpoint):
    with pytest.raises(ValueError, match="batch_size=1"):
        plugin(checkpoint, speculative=True, batch_size=2)
    assert plugin(checkpoint, batch_size=2).speculative is False  # the checkpoint's default gives way to the batch
    assert plugin(checkpoint).speculative is True


def test_loglikelihood_scores_the_greedy_answer(checkpoint):
    model = plugin(checkpoint, visual_token_budget=8, token_reduction="twig")
    answer, scores = reference_answer(model, doc_id=1, max_new_tokens=4)
    expected = sum(step.float().log_softmax(-1).max().item() for step in scores)
    wrong = answer[:-1] + ("a" if answer[-1] != "a" else "b")
    requests = [
        Instance(
            "loglikelihood",
            (DOCS[1]["question"], continuation, doc_to_visual, 1, TASK, SPLIT),
            idx=i,
            metadata={"task": TASK, "doc_id": 1, "repeats": 1},
        )
        for i, continuation in enumerate([answer, wrong])
    ]
    (greedy_log_prob, greedy), (wrong_log_prob, wrong_greedy) = [result.text for result in model.loglikelihood(requests)]
    assert greedy and not wrong_greedy
    assert greedy_log_prob == pytest.approx(expected, abs=1e-4)
    assert wrong_log_prob < greedy_log_prob


def test_multi_round_is_refused_clearly(checkpoint):
    with pytest.raises(NotImplementedError, match="multi-round"):
        plugin(checkpoint).generate_until_multi_round([])


def test_textvqa_with_ocr_tokens_uses_lmms_eval_textvqa():
    from lmms_eval.tasks.textvqa import utils as textvqa
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(TASKS_DIR / "textvqa_ocr" / "textvqa_val_ocr.yaml"))
    assert config["doc_to_text"] is textvqa.textvqa_doc_to_text
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    prompt = config["doc_to_text"]({"question": "what is written?", "ocr_tokens": ["STOP", "ahead"]}, kwargs)
    assert prompt == "What is written?\nReference OCR token: STOP, ahead\nAnswer the question using a single word or phrase."


def test_lmms_eval_command_runs_a_local_task(checkpoint, tmp_path):
    """The real `lmms-eval` program: generation and multiple-choice tasks on a local file, results and samples written."""
    output = tmp_path / "results"
    command = [
        os.path.join(os.path.dirname(sys.executable), "lmms-eval"),
        "--model", "twigvlm",
        "--model_args", f"pretrained={checkpoint},visual_token_budget=8,token_reduction=twig,speculative=true,dtype=float32",
        "--tasks", "twigvlm_shapes,twigvlm_shapes_choice",
        "--include_path", str(TASKS_DIR),
        "--batch_size", "1",
        "--limit", "2",
        "--device", "cpu",
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(command, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    # lmms-eval exits 0 even when evaluation fails, so the written files are the proof.
    results_files = glob.glob(str(output / "*" / "*_results.json"))
    assert run.returncode == 0 and len(results_files) == 1, log
    results = json.loads(open(results_files[0]).read())["results"]
    assert set(results) == {"twigvlm_shapes", "twigvlm_shapes_choice"}
    assert "exact_match,none" in results["twigvlm_shapes"] and "acc,none" in results["twigvlm_shapes_choice"]

    samples_file = glob.glob(str(output / "*" / "*_samples_twigvlm_shapes.jsonl"))[0]
    samples = [json.loads(line) for line in open(samples_file)]
    assert len(samples) == 2
    for sample in samples:
        (record,) = sample["token_counts"]
        assert record["kept_visual_tokens"] == [[0, 2, 16], [2, 6, 8], [6, 8, 0]]
        assert record["speculative"] is True and 0 <= record["acceptance_rate"] <= 1
