"""A small TwigVLM with random weights and a word-level tokenizer, built in well under a second, for the program's tests."""

import torch
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration
from twigvlm.conversion.processing import IMAGE_TOKEN, build_llava15_processor
from twigvlm.synthetic_vqa.tokenizer import build_word_tokenizer


IMAGE_SIZE, PATCH_SIZE = 112, 14
# Common English words, the words of LLaVA-1.5's prompt and words about the sample picture. The tokenizer lowercases.
WORDS = """
. , ? ! ' : ; - ( ) " s t 0 1 2 3 4 5 6 7 8 9 ten
a an the this that these those it its there here what which who whom whose when where why how
is are was were be been being am do does did done have has had having can could will would shall should may might
must not no yes and or but if then than so because as of in on at to from by with about above below under over
between into through during before after up down out off again further once only also very too just more most
less least much many few some any all both each every other another such own same one two three four five six
seven eight nine first second third last next i you he she we they me him her us them my your his our their
chat curious user human artificial intelligence assistant gives helpful detailed polite answers answer questions
question describe image picture photo see look show shows shown color colour colors colours shape shapes red green
blue yellow orange purple pink brown black white gray grey dark light bright circle square triangle rectangle line
lines star dot dots background foreground left right top bottom middle center corner side edge big small large
little tall short long wide round flat sharp thin thick new old good bad great best better high low near far
inside outside front behind next beside around across along toward object objects thing things part parts
number count people person man woman child dog cat bird tree sky sun water house car road table chair book
cup ball box door window wall floor room city street field grass flower hill mountain river sea sand snow cloud
day night time year way word make made go goes went come came get got take took give gave say said know knew
think thought tell told find found use used want like need feel seem try call ask work play move live believe
hold bring happen write provide sit stand lose pay meet include continue set learn change lead understand watch
follow stop create speak read allow add spend grow open walk win offer remember love consider appear buy wait
serve die send expect build stay fall cut reach kill remain suggest raise pass sell require report decide pull
well still even now then always never often sometimes together however really almost enough quite already
"""
def small_word_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(WORDS.split())


def small_twigvlm_config(tokenizer: PreTrainedTokenizerFast) -> TwigVLMConfig:
    """CLIP 112px/14 (64 image tokens) and an 8-layer LLaMA; twig on layer 2, 2 layers deep, FinalWipe at layer 6."""
    num_image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2
    return TwigVLMConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "projection_dim": 64,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 96,
            "intermediate_size": 256,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 512,
            # Wider than LLaMA's 0.02, so that the random model's answer varies from word to word instead of
            # repeating one word.
            "initializer_range": 0.2,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_image_tokens,
        twig_attach_layer=2,
        num_twig_layers=2,
        final_wipe_layer=6,
        # R = ceil((8·24 − 2·64) / (6 − 2)) = 16 of the 64 image tokens for layers 2..5.
        visual_token_budget=24,
    )


def build_small_twigvlm(seed: int = 0) -> tuple[TwigVLMForConditionalGeneration, LlavaProcessor]:
    """The small TwigVLM and its LLaVA-1.5 processor; the same seed gives the same weights."""
    tokenizer = small_word_tokenizer()
    processor = build_llava15_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = small_twigvlm_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = TwigVLMForConditionalGeneration(config).eval()
    # Random weights do not know that an answer is never empty nor holds these tokens; a trained model would.
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "<pad>", IMAGE_TOKEN]),
        begin_suppress_tokens=[tokenizer.eos_token_id],
    )
    return model, processor


def save_small_twigvlm(folder) -> None:
    """The small TwigVLM (seed 0) and its processor as a Hub-style folder."""
    model, processor = build_small_twigvlm()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
