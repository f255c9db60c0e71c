"""The gradio demo: launched on a loopback port, it answers one request through gradio's own client."""

import os
import socket

import pytest
import torch
from PIL import Image, ImageDraw

from test_speculative import twig_copy_of_deep_layers
from tiny_processor import tiny_processor


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gradio = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .[demo] or .[test])")
gradio_client = pytest.importorskip("gradio_client")

from twigvlm.demo.app import ACCEPTED, build_demo  # noqa: E402
from twigvlm.evaluation.prompting import chat_inputs  # noqa: E402


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_demo_answers_through_gradio_client(tmp_path):
    # A twig that copies the deep layers, without pruning: drafts get accepted, so their marking shows.
    model, processor = twig_copy_of_deep_layers(), tiny_processor()
    image = Image.new("RGB", (80, 56), "white")
    ImageDraw.Draw(image).ellipse((10, 8, 50, 48), fill="red")
    image_path = tmp_path / "ball.png"
    image.save(image_path)
    question, budget, max_new_tokens = "What is red?", 8, 12

    demo = build_demo(model, processor)
    port = free_loopback_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit(
            gradio_client.handle_file(str(image_path)), question, "none", budget, True, max_new_tokens,
            api_name="/answer",
        )  # fmt: skip
        spans, picture_path, stats = job.result(timeout=120)
        streamed = job.outputs()
    finally:
        demo.close()

    # The streamed answer is model.generate's, and the marked part is what the statistics say was accepted.
    inputs = chat_inputs(processor, [question], [[Image.open(image_path)]], model.device, model.dtype)
    expected = model.generate(
        **inputs, token_reduction="none", visual_token_budget=budget, max_new_tokens=max_new_tokens,
        do_sample=False, speculative_decoding=False,
    )  # fmt: skip
    expected_text = processor.tokenizer.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "".join(span["token"] for span in spans) == expected_text
    assert len(streamed) > 2, "the answer should arrive in several steps"
    accepted_chars = sum(len(span["token"]) for span in spans if span["class_or_confidence"] == ACCEPTED)
    assert accepted_chars > 0 and f"Drafts: {accepted_chars} of" in stats  # one character per token (tiny tokenizer)
    assert "Visual tokens of 16: layers 0–1: 16, layers 2–3: 16" in stats
    picture = Image.open(picture_path)
    assert picture.size[0] > picture.size[1] > 0
