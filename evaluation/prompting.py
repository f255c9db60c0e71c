"""One user turn through the checkpoint's own chat template, as LLaVA-1.5 was trained and evaluated."""

import torch
from PIL import Image


def chat_prompt(processor, question: str, num_images: int) -> str:
    """
    The chat-template text of one user turn ending where the assistant answers. Images come first, as LLaVA-1.5's
    evaluation puts `<image>\\n` before the question; a question that already holds `<image>` keeps its own layout.
    """
    image_token = getattr(processor, "image_token", "<image>")
    parts = [] if image_token in question else [{"type": "image"}] * num_images
    content = parts + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def chat_inputs(processor, questions: list[str], images: list[list[Image.Image]], device: torch.device, dtype: torch.dtype):
    """Padded model inputs for a batch of (question, its images) pairs, with pixel values in the model's dtype."""
    prompts = [chat_prompt(processor, question, len(row)) for question, row in zip(questions, images)]
    return encode(processor, prompts, images, device, dtype)


def encode(processor, prompts: list[str], images: list[list[Image.Image]], device: torch.device, dtype: torch.dtype):
    """Tokenized prompts (image tokens expanded) and pixel values, on the model's device and in its dtype."""
    flat_images = [image.convert("RGB") for row in images for image in row]
    inputs = processor(text=prompts, images=flat_images or None, padding=True, return_tensors="pt")
    inputs = inputs.to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs
