"""A LLaVA-1.5-style processor for the tiny models: character tokenizer, pad-to-square image processor, chat template."""

import string

from tokenizers import Tokenizer, decoders, models
from transformers import LlavaImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from tiny_models import IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, PATCH_SIZE, VOCAB_SIZE, tiny_twigvlm


CHAT_TEMPLATE = (
    "{{ 'A chat between a curious user and an artificial intelligence assistant. ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """
    One token per character (printable ASCII, then accented letters up to the tiny models' 120-token vocabulary), so
    text round-trips and every generated token that is not special shows as exactly one character.
    """
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    characters = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    tokens = specials + characters
    tokens += [chr(0xC0 + i) for i in range(IMAGE_TOKEN_ID - len(tokens))] + ["<image>"]
    assert len(tokens) == VOCAB_SIZE and tokens.index("<pad>") == PAD_TOKEN_ID
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def tiny_processor() -> LlavaProcessor:
    image_processor = LlavaImageProcessor(
        do_pad=True,
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_checkpoint(path, seed: int = 0) -> None:
    """A tiny TwigVLM checkpoint folder with its processor, loadable as any TwigVLM checkpoint is."""
    tiny_twigvlm(seed=seed).save_pretrained(path)
    tiny_processor().save_pretrained(path)
