"""
An interactive TwigVLM demo in the browser (gradio): upload an image, ask, pick the token-reduction method and the
budget, and watch the answer stream with the tokens of accepted drafts marked, beside the picture of the kept
patches and the timing and acceptance figures. It listens on 127.0.0.1 unless told otherwise.
"""

import argparse
import os
import queue
import threading
import time
from collections.abc import Iterator

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from twigvlm import output_cache
from twigvlm.app.bundled_model import BUNDLED_MODEL_DIR
from twigvlm.configuration_twigvlm import TOKEN_REDUCTIONS
from twigvlm.evaluation.loading import load_twigvlm
from twigvlm.evaluation.prompting import chat_inputs
from twigvlm.evaluation.statistics import pruning_record, speculation_record
from twigvlm.visualization import draw_kept_patches, find_kept_patches, model_view


ACCEPTED = "accepted draft"
BUNDLED_MODEL_NOTE = (
    "No --model given: the demo runs the small TwigVLM of `twigvlm`, trained here on synthetic pictures of coloured "
    "shapes; it answers that task's questions only. Pass --model PATH_OR_REPO to run a real checkpoint."
)


class DraftSegmentStreamer(BaseStreamer):
    """
    Hands each chunk `generate` streams to a queue as (accepted draft tokens, the full model's own tokens). Under
    self-speculative decoding a chunk is one verification round, its last token the verifier's; otherwise one token.
    """

    def __init__(self):
        self.chunks: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first chunk is the prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        self.chunks.put((tokens[:-1], tokens[-1:]))

    def end(self) -> None:
        self.chunks.put(None)


def highlighted(tokenizer, segments: list[tuple[list[int], bool]]) -> list[tuple[str, str | None]]:
    """Text spans for gradio's HighlightedText, decoding the whole answer so that multi-token characters stay whole."""
    spans, token_ids, text_so_far = [], [], ""
    for ids, accepted in segments:
        token_ids += ids
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        if text[len(text_so_far) :]:
            spans.append((text[len(text_so_far) :], ACCEPTED if accepted else None))
        text_so_far = text
    return spans


def figures(stats: dict, num_new_tokens: int, seconds: float) -> str:
    """The statistics box: visual tokens per layer group, speed, and drafting figures when there were drafts."""
    lines = [f"**{num_new_tokens} tokens in {seconds:.2f} s** ({num_new_tokens / max(seconds, 1e-9):.1f} tokens/s)"]
    groups = ", ".join(f"layers {first}–{end - 1}: {n}" for first, end, n in stats["kept_visual_tokens"])
    if groups:
        lines.append(f"Visual tokens of {stats['visual_tokens']}: {groups}")
        lines.append(f"Average per layer (R̄): {stats['mean_visual_tokens_per_layer']:.1f}")
    if "drafted_tokens" in stats:
        lines.append(
            f"Drafts: {stats['accepted_tokens']} of {stats['drafted_tokens']} accepted "
            f"({stats['acceptance_rate']:.0%}) in {stats['draft_rounds']} rounds, "
            f"{stats['mean_accepted_length']:.2f} accepted per round"
        )
    return "\n\n".join(lines)


def answer_stream(
    model,
    processor,
    image: Image.Image,
    question: str,
    method: str,
    budget: float,
    speculative: bool,
    max_new_tokens: int,
) -> Iterator[tuple[list[tuple[str, str | None]], Image.Image | None, str]]:
    """Yields (answer spans, kept-token picture, statistics) as the answer grows; the last yield is complete."""
    if image is None or not question:
        raise ValueError("Upload an image and ask a question.")
    kept = find_kept_patches(model, processor, image, question, method, visual_token_budget=budget)
    picture = draw_kept_patches(model_view(image, processor.image_processor), [kept])
    inputs = chat_inputs(processor, [question], [[image]], model.device, model.dtype)
    streamer = DraftSegmentStreamer()
    result: dict = {}

    def generate() -> None:
        try:
            with torch.inference_mode():
                result["output"] = model.generate(
                    **inputs,
                    token_reduction=method,
                    visual_token_budget=budget,
                    speculative_decoding=speculative,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    return_dict_in_generate=True,
                )
        except Exception as error:  # reported in the page, not lost in the thread
            result["error"] = error
            streamer.end()

    started = time.perf_counter()
    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    segments: list[tuple[list[int], bool]] = []
    while (chunk := streamer.chunks.get()) is not None:
        drafted, own = chunk
        segments += [(drafted, True), (own, False)]
        yield highlighted(processor.tokenizer, segments), picture, "generating…"
    worker.join()
    if "error" in result:
        raise result["error"]
    seconds = time.perf_counter() - started
    cache = output_cache(result["output"])
    stats = {
        **pruning_record(cache, model.config.text_config.num_hidden_layers),
        **speculation_record(cache),
    }
    num_new = result["output"].sequences.shape[1] - inputs["input_ids"].shape[1]
    yield highlighted(processor.tokenizer, segments), picture, figures(stats, num_new, seconds)


def build_demo(model, processor, methods: list[str] | None = None):
    """The gradio page around one loaded model; `answer` is also its API endpoint (`/answer`)."""
    import gradio as gr

    methods = methods or list(TOKEN_REDUCTIONS)
    config = model.config
    drafts_by_default = model.generation_config.assistant_early_exit is not None

    def answer(image, question, method, budget, speculative, max_new_tokens):
        try:
            yield from answer_stream(model, processor, image, question, method, budget, speculative, int(max_new_tokens))
        except ValueError as error:
            raise gr.Error(str(error)) from error

    with gr.Blocks(title="TwigVLM") as demo:
        gr.Markdown(
            "# TwigVLM\nTwig-guided token pruning and self-speculative decoding. "
            f"Tokens from accepted drafts are marked as *{ACCEPTED}*."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image")
                question = gr.Textbox(label="Question", value="Describe the image.")
                method = gr.Radio(methods, value=config.token_reduction, label="Token reduction")
                budget = gr.Slider(
                    0, config.image_seq_length, value=config.visual_token_budget, step=1,
                    label="Visual-token budget R̄ (average per layer)",
                )  # fmt: skip
                speculative = gr.Checkbox(value=drafts_by_default, label="Self-speculative decoding")
                max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens")
                ask = gr.Button("Ask", variant="primary")
            with gr.Column():
                spans = gr.HighlightedText(label="Answer", color_map={ACCEPTED: "green"}, show_legend=True)
                picture = gr.Image(type="pil", label="Kept visual tokens")
                stats = gr.Markdown()
        ask.click(
            answer,
            inputs=[image, question, method, budget, speculative, max_new_tokens],
            outputs=[spans, picture, stats],
            api_name="answer",
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="twigvlm-demo", description=__doc__)
    parser.add_argument(
        "--model", help="TwigVLM checkpoint folder or Hub repo (default: the small model of `twigvlm`, trained here)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo sends nothing out unless asked

    if args.model is None:
        print(BUNDLED_MODEL_NOTE, flush=True)
    model, processor = load_twigvlm(args.model or str(BUNDLED_MODEL_DIR), args.dtype, args.device)
    build_demo(model, processor).queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
