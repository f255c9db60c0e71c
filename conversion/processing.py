"""The LLaVA-1.5 processor a TwigVLM checkpoint ships: CLIP preprocessing, pad-to-square, the vicuna_v1 prompt."""

from tokenizers import AddedToken
from transformers import LlavaImageProcessorPil, LlavaProcessor, PreTrainedTokenizerBase
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling


IMAGE_TOKEN = "<image>"

# LLaVA-1.5's `conv_vicuna_v1`, the conversation of its training and of its `--conv-mode vicuna_v1` evaluation:
# "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ...". The images of a user turn go first, each
# followed by a newline, as LLaVA moves `<image>` to the front of the first message. No BOS: the tokenizer adds it.
# A first system message replaces the default system prompt; answers are marked for `return_assistant_tokens_mask`.
LLAVA_V15_CHAT_TEMPLATE = r"""
{%- set ns = namespace(system="A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.") -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set ns.system = messages[0]['content'] -%}
    {%- else -%}
        {%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}
    {%- endif -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{{- ns.system + ' ' -}}
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set images = '' -%}
        {%- set text = message['content'] | trim -%}
    {%- else -%}
        {%- set images = '<image>\n' * (message['content'] | selectattr('type', 'equalto', 'image') | list | length) -%}
        {%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') | trim -%}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' + images + text + ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' -}}
        {%- generation -%}{{- text + '</s>' -}}{%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('LLaVA-1.5 conversations have user and assistant turns after an optional first system message, not ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
""".strip()


def build_llava15_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_size: int = 336,
    patch_size: int = 14,
    image_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN),
    image_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD),
) -> LlavaProcessor:
    """
    A [`LlavaProcessor`] preparing inputs as LLaVA-1.5 does; saved with a checkpoint, `AutoProcessor` gives it back.

    Images are padded to a square with the mean colour (`int(255 * mean)` per channel, LLaVA-1.5's `expand2square`),
    resized (bicubic) to `image_size` on the shortest edge, center-cropped and CLIP-normalised. `<image>` in the text
    expands to `(image_size // patch_size) ** 2` tokens: the CLIP patches without the CLS token.

    The tokenizer is changed in place: `<image>` is added as a special token when missing (the model's
    `image_token_index` must then be its new id), and a missing pad token becomes the unknown token, as LLaVA-1.5 does.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    # The PIL backend resizes with PIL as LLaVA-1.5's CLIPImageProcessor did; it is saved as "LlavaImageProcessor".
    image_processor = LlavaImageProcessorPil(
        do_pad=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_V15_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


__all__ = ["IMAGE_TOKEN", "LLAVA_V15_CHAT_TEMPLATE", "build_llava15_processor"]
