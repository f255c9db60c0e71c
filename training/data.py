"""LLaVA instruction data (llava_v1_5_mix665k.json format) for twig training, in LLaVA-1.5's vicuna_v1 template."""

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from transformers import ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
# LLaVA-1.5's "v1" conversation template (vicuna_v1), as its SFT and the twig's training use it.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_ROLES = {"human": "USER", "gpt": "ASSISTANT"}


class BadRecordError(ValueError):
    """A training record that cannot be used; the message names it."""


def answered_turns(turns: list) -> list:
    """As LLaVA does, drop a leading assistant turn and a last question without answer: neither is supervised."""
    start = 1 if turns and isinstance(turns[0], dict) and turns[0].get("from") == "gpt" else 0
    end = len(turns) - (len(turns) - start) % 2
    return turns[start:end]


def record_problem(record: object, image_folder: str | None) -> tuple[str, str] | None:
    """What is wrong with one record of the LLaVA conversation format, as (kind, detail), or None when it is usable."""
    if not isinstance(record, dict):
        return "not a record", f"is a {type(record).__name__}, not an object"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not answered_turns(turns):
        return "empty conversation", "has an empty conversation (no question with its answer)"
    turns = answered_turns(turns)
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            return (
                "ill-formed conversation",
                f"turn {i} is not a {expected!r} turn with a text value (turns alternate)",
            )
    placeholders = [turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns]
    image = record.get("image")
    if image is None:
        if sum(placeholders):
            return "placeholder mismatch", f"has {sum(placeholders)} {IMAGE_PLACEHOLDER} placeholder(s) but no image"
        return None
    if not isinstance(image, str):
        return "placeholder mismatch", f"has an 'image' of type {type(image).__name__}; one image path is supported"
    if sum(placeholders) != 1 or sum(placeholders[1::2]):
        return "placeholder mismatch", (
            f"has one image but {sum(placeholders)} {IMAGE_PLACEHOLDER} placeholders (per turn: {placeholders}); "
            "exactly one, in a human turn, is expected"
        )
    if image_folder is None:
        return "missing image file", "has an image but no image folder was given"
    if not os.path.isfile(os.path.join(image_folder, image)):
        return "missing image file", f"names image file {image!r}, which is not in {image_folder}"
    return None


def vicuna_v1_prompt(turns: Sequence[dict], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """
    The conversation in the vicuna_v1 template and the character spans of the assistant answers (each with its EOS),
    the only supervised text. As in LLaVA, the image placeholder moves to the start of its turn, followed by a newline.
    """
    text = VICUNA_V1_SYSTEM + " "
    answer_spans = []
    for turn in turns:
        value = turn["value"]
        if IMAGE_PLACEHOLDER in value:
            value = IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()
        if turn["from"] == "human":
            text += f"{VICUNA_V1_ROLES['human']}: {value} {VICUNA_V1_ROLES['gpt']}: "
        else:
            start = len(text)
            text += value + eos_token
            answer_spans.append((start, len(text)))
    return text, answer_spans


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5 pads images to a square of the processor's mean colour (its "pad" aspect ratio) before resizing."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class LlavaConversationDataset(Dataset):
    """
    Records of the LLaVA conversation format: `{"id", "image" (optional, relative to `image_folder`), "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`.

    Every record is checked when the dataset is built: a malformed one (missing image file, placeholder and image not
    matching, empty or ill-formed conversation) raises [`BadRecordError`] naming the first, or with
    `skip_bad_records=True` is left out and counted in the log. Items hold `input_ids` with the image placeholder
    expanded by the processor, `labels` equal to the ids on the assistant answers and -100 elsewhere, and
    `pixel_values` of the image padded to a square (for records with an image).
    """

    def __init__(
        self,
        records: str | os.PathLike | list[dict],
        processor: ProcessorMixin,
        image_folder: str | os.PathLike | None = None,
        max_length: int = 2048,
        pad_to_square: bool = True,
        skip_bad_records: bool = False,
    ):
        if not isinstance(records, list):
            with open(records) as file:
                records = json.load(file)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.background = tuple(int(255 * mean) for mean in processor.image_processor.image_mean)

        self.records, self.skipped = [], Counter()
        first_problem = None
        for index, record in enumerate(records):
            problem = record_problem(record, self.image_folder)
            if problem is None:
                self.records.append((index, record))
                continue
            message = f"Record {index} ({record_name(record)}) {problem[1]}."
            if not skip_bad_records:
                raise BadRecordError(message + " Fix it, or pass --skip_bad_records to leave such records out.")
            first_problem = first_problem or message
            self.skipped[problem[0]] += 1
        if self.skipped:
            counts = ", ".join(f"{kind}: {count}" for kind, count in self.skipped.most_common())
            logger.warning(
                f"Skipped {self.num_skipped} of {len(records)} records as malformed ({counts}; "
                f"first: {first_problem}); training on {len(self.records)}."
            )
        if not self.records:
            raise BadRecordError("No usable training record.")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.records)

    def modality_lengths(self) -> tuple[list[int], list[bool]]:
        """Word counts (cheap length estimates) and whether each record has an image, to group by modality length."""
        lengths = [sum(len(turn["value"].split()) for turn in record["conversations"]) for _, record in self.records]
        return lengths, ["image" in record for _, record in self.records]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index, record = self.records[i]
        try:
            return self.encode(record)
        except (OSError, ValueError) as error:
            raise BadRecordError(f"Record {index} ({record_name(record)}): {error}") from error

    def encode(self, record: dict) -> dict[str, torch.Tensor]:
        text, answer_spans = vicuna_v1_prompt(answered_turns(record["conversations"]), self.tokenizer.eos_token)
        # Labels come from character offsets on the unexpanded text (one placeholder token), then follow the
        # processor's expansion of that token, so answers are found whatever the tokenizer merges.
        encoding = self.tokenizer(text, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        labels = [
            token
            if any(start < span_end and end > span_start for span_start, span_end in answer_spans)
            else IGNORE_INDEX
            for token, (start, end) in zip(ids, encoding["offset_mapping"])
        ]
        item = {}
        if "image" in record:
            image = Image.open(os.path.join(self.image_folder, record["image"])).convert("RGB")
            if self.pad_to_square:
                image = expand_to_square(image, self.background)
            processed = self.processor(images=[image], text=text, return_tensors="pt")
            expanded = processed["input_ids"][0].tolist()
            ids, labels = self.expand_image_token(ids, labels, expanded)
            item["pixel_values"] = processed["pixel_values"][0]
        if self.image_token_id in ids[self.max_length :]:
            raise ValueError(f"its image tokens end beyond max_length={self.max_length}")
        item["input_ids"] = torch.tensor(ids[: self.max_length])
        item["labels"] = torch.tensor(labels[: self.max_length])
        return item

    def expand_image_token(self, ids: list[int], labels: list[int], expanded: list[int]) -> tuple[list, list]:
        position = ids.index(self.image_token_id)
        count = len(expanded) - len(ids) + 1
        if count < 1 or expanded[:position] + expanded[position + count :] != ids[:position] + ids[position + 1 :]:
            raise ValueError(
                "the processor's tokens differ from the tokenizer's beyond the expanded image placeholder; the image "
                "token must be a special token of the tokenizer"
            )
        labels = labels[:position] + [IGNORE_INDEX] * count + labels[position + 1 :]
        return expanded, labels


def record_name(record: object) -> str:
    return f"id {record.get('id')!r}" if isinstance(record, dict) and "id" in record else "no id"


@dataclass
class TwigDataCollator:
    """Right-pads a batch; stacks the images of the records that have one (in order, as the model consumes them)."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id)
        labels = torch.full((len(items), length), IGNORE_INDEX)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            size = len(item["input_ids"])
            input_ids[row, :size] = item["input_ids"]
            labels[row, :size] = item["labels"]
            attention_mask[row, :size] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [item["pixel_values"] for item in items if "pixel_values" in item]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


class ModalityLengthGroupedSampler(Sampler[int]):
    """
    LLaVA's grouping by modality length: shuffled records are cut into groups of one global batch with images only or
    text only, each sorted by length so that the batches cut from it pad little; the groups come in random order and
    the leftovers of both modalities form the last group. Deterministic for a seed and an epoch, so resuming sees the
    same order.
    """

    def __init__(self, lengths: list[int], has_image: list[bool], group_size: int, seed: int = 0):
        self.lengths, self.has_image = lengths, has_image
        self.group_size, self.seed, self.epoch = group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        groups, leftovers = [], []
        for modality in (True, False):
            indices = [i for i, has_image in enumerate(self.has_image) if has_image == modality]
            indices = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.group_size):
                group = indices[start : start + self.group_size]
                if len(group) == self.group_size:
                    groups.append(group)
                else:
                    leftovers.extend(group)
        order = torch.randperm(len(groups), generator=generator).tolist()
        for group in [groups[j] for j in order] + [leftovers]:
            yield from sorted(group, key=lambda i: -self.lengths[i])
