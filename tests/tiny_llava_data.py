"""A word-level LLaVA processor for the tiny models and a small learnable task in the LLaVA conversation format."""

import json
import random
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from tiny_models import IMAGE_SIZE, IMAGE_TOKEN_ID, PATCH_SIZE, VOCAB_SIZE


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 170),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
NUMBERS = [str(n) for n in range(10)]
WORDS = (
    "A chat between a curious user and an artificial intelligence assistant . The gives helpful , detailed polite "
    "answers to the ' s questions USER ASSISTANT : what colour is image ? yes no comes after"
).split()


def tiny_processor() -> LlavaProcessor:
    """LLaVA-1.5's processor (CLIP preprocessing, `<image>` expanded to the patch count) with a word vocabulary."""
    words = ["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(WORDS), *COLOURS, *NUMBERS]
    words += [f"<unused{i}>" for i in range(IMAGE_TOKEN_ID - len(words))] + ["<image>"]
    assert len(words) == VOCAB_SIZE and words.index("<image>") == IMAGE_TOKEN_ID
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def colour_task(image_folder: Path, num_records: int, seed: int, text_share: float = 0.25) -> list[dict]:
    """
    Records of a task a twig can learn: the colour of a plain image of random size (so pad-to-square matters), whether
    it is a given colour (a second turn), and, without image, the number after a digit. Images are written to
    `image_folder`.
    """
    rng = random.Random(seed)
    image_folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_records):
        if rng.random() < text_share:
            n = rng.randrange(9)
            turns = [("what comes after " + str(n) + " ?", str(n + 1))]
            records.append(conversation(f"text-{seed}-{i}", turns))
            continue
        colour = rng.choice(list(COLOURS))
        asked = rng.choice(list(COLOURS))
        size = (rng.randrange(20, 90), rng.randrange(20, 90))
        name = f"{seed}-{i}.png"
        Image.new("RGB", size, COLOURS[colour]).save(image_folder / name)
        turns = [("<image>\nwhat colour is the image ?", colour)]
        if rng.random() < 0.5:
            turns.append((f"is the image {asked} ?", "yes" if asked == colour else "no"))
        records.append(conversation(f"image-{seed}-{i}", turns, image=name))
    return records


def conversation(record_id: str, turns: list[tuple[str, str]], image: str | None = None) -> dict:
    record = {"id": record_id, "conversations": []}
    if image is not None:
        record["image"] = image
    for question, answer in turns:
        record["conversations"] += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return record


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path
