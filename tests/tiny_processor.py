"""The LLaVA-1.5 processor for the tiny models, with a character tokenizer that fits their 120-token vocabulary."""

import string

from tokenizers import Tokenizer, decoders, models
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from twigvlm.conversion.processing import build_llava15_processor

from tiny_models import IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, PATCH_SIZE, VOCAB_SIZE, tiny_twigvlm


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
    """The LLaVA-1.5 processor a TwigVLM checkpoint ships, sized for the tiny models' 56 px images."""
    return build_llava15_processor(tiny_tokenizer(), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


def save_tiny_checkpoint(path, seed: int = 0) -> None:
    """A tiny TwigVLM checkpoint folder with its processor, loadable as any TwigVLM checkpoint is."""
    tiny_twigvlm(seed=seed).save_pretrained(path)
    tiny_processor().save_pretrained(path)
