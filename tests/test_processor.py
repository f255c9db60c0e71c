"""The LLaVA-1.5 processor: image-token count, pad-to-square preprocessing, the vicuna_v1 prompt, save and reload."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, LlavaProcessor, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from small_random_model import small_word_tokenizer
from twigvlm.conversion.processing import LLAVA_V15_CHAT_TEMPLATE, build_llava15_processor


SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def striped_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colours, so that a wrong resize, crop or channel order shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def llava15_reference_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """LLaVA-1.5's preprocessing written out: expand2square with the mean colour, bicubic resize, CLIP normalising."""
    background = tuple(int(255 * mean) for mean in OPENAI_CLIP_MEAN)
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    resized = np.asarray(square.resize((image_size, image_size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    normalised = (resized - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1)[None]


def user_turn(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


@pytest.mark.parametrize("image_size, patch_size", [(336, 14), (112, 14), (224, 16)])
def test_image_token_expands_to_one_token_per_patch(image_size, patch_size):
    processor = build_llava15_processor(small_word_tokenizer(), image_size=image_size, patch_size=patch_size)
    prompt = processor.apply_chat_template([user_turn("What is in the picture?")], add_generation_prompt=True)
    inputs = processor(images=striped_image(90, 50), text=prompt, return_tensors="pt")

    num_image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert num_image_tokens == (image_size // patch_size) ** 2  # 576 for LLaVA-1.5: the CLS token is not counted
    assert inputs["pixel_values"].shape == (1, 3, image_size, image_size)


@pytest.mark.parametrize("width, height", [(120, 40), (30, 100), (64, 64)])
def test_pixels_equal_llava15_preprocessing(width, height):
    processor = build_llava15_processor(small_word_tokenizer(), image_size=112)
    image = striped_image(width, height)
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, llava15_reference_pixels(image, 112), atol=1e-5, rtol=0)


def test_padding_is_the_mean_colour():
    """A wide white image: the rows above and below it hold LLaVA's background `int(255 * mean)`, normalised ~0."""
    processor = build_llava15_processor(small_word_tokenizer(), image_size=112)
    image = Image.new("RGB", (200, 50), (255, 255, 255))  # the image covers rows 42..69 of the 112 after padding
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    background = (
        torch.tensor([int(255 * mean) for mean in OPENAI_CLIP_MEAN]) / 255 - torch.tensor(OPENAI_CLIP_MEAN)
    ) / (torch.tensor(OPENAI_CLIP_STD))
    padding = torch.cat([pixel_values[:, :38], pixel_values[:, 74:]], dim=1)
    torch.testing.assert_close(padding, background[:, None, None].expand_as(padding), atol=1e-5, rtol=0)
    assert padding.abs().max() < 0.02
    white = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(pixel_values[:, 46:66], white[:, None, None].expand(3, 20, 112), atol=1e-5, rtol=0)


def test_chat_template_renders_the_llava15_prompt():
    processor = build_llava15_processor(small_word_tokenizer())
    prompt = processor.apply_chat_template([user_turn("What is shown here?")], add_generation_prompt=True)
    assert prompt == f"{SYSTEM} USER: <image>\nWhat is shown here? ASSISTANT:"

    conversation = [
        user_turn("What is shown here?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colour is it?"}]},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        f"{SYSTEM} USER: <image>\nWhat is shown here? ASSISTANT: A red circle.</s>USER: Which colour is it? ASSISTANT:"
    )
    # The image goes first even when the message lists it after the text; plain-string content and a system message.
    assert processor.apply_chat_template(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": " Count them. "}, {"type": "image"}]},
            {"role": "assistant", "content": "Three."},
        ]
    ) == ("Answer briefly. USER: <image>\nCount them. ASSISTANT: Three.</s>")


def test_chat_template_refuses_unknown_roles():
    processor = build_llava15_processor(small_word_tokenizer())
    with pytest.raises(Exception, match="user and assistant turns"):
        processor.apply_chat_template([{"role": "tool", "content": "42"}])


def test_prompt_tokens_start_with_one_bos():
    """The template has no `<s>`: the tokenizer adds it once, as LLaVA-1.5's `tokenizer_image_token` does."""
    processor = build_llava15_processor(small_word_tokenizer(), image_size=112)
    prompt = processor.apply_chat_template([user_turn("What is this?")], add_generation_prompt=True)
    input_ids = processor(images=striped_image(40, 40), text=prompt)["input_ids"][0]
    assert input_ids[0] == processor.tokenizer.bos_token_id
    assert input_ids.count(processor.tokenizer.bos_token_id) == 1


def test_image_token_is_added_to_a_tokenizer_without_it():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "what": 3, "is": 4, "this": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")

    processor = build_llava15_processor(tokenizer, image_size=28, patch_size=14)
    assert processor.image_token_id == len(vocab)  # the model's image_token_index must be this new id
    assert tokenizer.encode("what<image>is", add_special_tokens=False) == [3, len(vocab), 4]
    assert tokenizer.decode([3, len(vocab), 4], skip_special_tokens=True) == "what is"  # special: skipped
    assert tokenizer.pad_token == "<unk>"  # LLaVA-1.5 pads with the unknown token


def test_save_and_auto_processor_round_trip(tmp_path):
    processor = build_llava15_processor(small_word_tokenizer(), image_size=112)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)

    assert type(reloaded) is LlavaProcessor  # the library class: no remote code needed for the processor
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "LlavaProcessor"
    assert reloaded.chat_template == LLAVA_V15_CHAT_TEMPLATE
    assert (reloaded.patch_size, reloaded.num_additional_image_tokens, reloaded.vision_feature_select_strategy) == (
        14,
        1,
        "default",
    )
    conversation = [user_turn("What shapes are there?")]
    for image in (striped_image(150, 60), striped_image(60, 150, seed=1)):
        prompts = [p.apply_chat_template(conversation, add_generation_prompt=True) for p in (processor, reloaded)]
        assert prompts[0] == prompts[1]
        original, loaded = (p(images=image, text=prompts[0], return_tensors="pt") for p in (processor, reloaded))
        assert original.keys() == loaded.keys()
        for key in original:
            assert torch.equal(original[key], loaded[key]), key
