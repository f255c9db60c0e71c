"""Word-level tokenizers: one word, one token, which is all a task with a closed vocabulary needs."""

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from twigvlm.conversion.processing import IMAGE_TOKEN, build_llava15_processor
from twigvlm.training.data import VICUNA_V1_SYSTEM

from .questions import task_words


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# The words of LLaVA-1.5's conversation template (system prompt and roles), which every prompt holds, split as the
# tokenizer splits them.
TEMPLATE_WORDS = [
    word.lower() for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(VICUNA_V1_SYSTEM + " USER: ASSISTANT:")
]


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer that adds `<s>` in front, like LLaMA's; unknown words become `<unk>`."""
    vocab = SPECIAL_TOKENS + [IMAGE_TOKEN] + list(dict.fromkeys(words))
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab.index("<s>"))]
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS + [IMAGE_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_task_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    """LLaVA-1.5's processor (CLIP preprocessing, vicuna_v1 template) over the task's word-level tokenizer."""
    tokenizer = build_word_tokenizer(TEMPLATE_WORDS + ["?"] + task_words())
    return build_llava15_processor(tokenizer, image_size=image_size, patch_size=patch_size)
