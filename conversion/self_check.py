"""
The self-check a conversion runs before it keeps its output: the written folder, loaded as users load it, against an
independent computation from the input tensors, on a probe image and prompt.

The base's logits are compared with transformers' own `LlavaForConditionalGeneration` holding the input weights, and
the twig's with base layers 0..K-1 of that model followed by the input twig's layers, norm and head (transformers'
`LlamaDecoderLayer`). Both sides run in the output dtype on one device, one model in memory at a time.
"""

import gc
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import init_empty_weights
from PIL import Image
from transformers import AutoModelForImageTextToText, BatchFeature, LlavaForConditionalGeneration, ProcessorMixin
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from twigvlm import TwigVLMConfig

from .configs import llava_config_of
from .writer import TensorSource, cast


PROBE_QUESTION = "What is shown in this image? Describe the colours and shapes."
ATTENTION = "sdpa"
# Largest logit difference allowed, relative to the largest reference logit. Both sides compute the same operations in
# the same dtype, so differences are rounding only; the figures leave room for other kernels' summation order.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class SelfCheckReport:
    dtype: torch.dtype
    device: str
    num_probe_tokens: int
    base_max_difference: float
    twig_max_difference: float
    base_logit_scale: float
    twig_logit_scale: float
    same_next_token: bool

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE[self.dtype]

    @property
    def passed(self) -> bool:
        return (
            self.base_max_difference <= self.tolerance * self.base_logit_scale
            and self.twig_max_difference <= self.tolerance * self.twig_logit_scale
        )

    def summary(self) -> str:
        return (
            f"probe of {self.num_probe_tokens} tokens in {str(self.dtype).removeprefix('torch.')} on {self.device}: "
            f"base logits max |difference| {self.base_max_difference:.3g} (largest logit {self.base_logit_scale:.3g}), "
            f"twig logits max |difference| {self.twig_max_difference:.3g} (largest logit {self.twig_logit_scale:.3g}); "
            f"allowed {self.tolerance:g} of the largest logit; same next token: {self.same_next_token}"
        )


def probe_image() -> Image.Image:
    """A fixed, non-square picture (so padding to a square is exercised): a colour gradient with a dark square."""
    y, x = np.mgrid[0:96, 0:128]
    pixels = np.stack([x * 2, y * 2, 255 - x - y], axis=-1).clip(0, 255).astype(np.uint8)
    pixels[24:72, 40:88] = (20, 20, 20)
    return Image.fromarray(pixels)


def probe_inputs(processor: ProcessorMixin) -> BatchFeature:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=probe_image(), text=prompt, return_tensors="pt")


def load_into(module: torch.nn.Module, tensors: dict[str, TensorSource], prefix: str, dtype: torch.dtype, device: str):
    state = {name.removeprefix(prefix): cast(name, source.load(), dtype) for name, source in tensors.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device).eval()


@torch.no_grad()
def reference_logits(
    config: TwigVLMConfig, tensors: dict[str, TensorSource], inputs: BatchFeature, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and twig logits computed with transformers' LLaVA and Llama layers from the conversion's input tensors."""
    base = {name: source for name, source in tensors.items() if not name.startswith("model.twig.")}
    twig = {name: source for name, source in tensors.items() if name.startswith("model.twig.")}
    llava_config = llava_config_of(config)
    llava_config.text_config._attn_implementation = ATTENTION
    llava_config.vision_config._attn_implementation = ATTENTION
    text_config = llava_config.text_config
    with init_empty_weights(include_buffers=False):
        llava = LlavaForConditionalGeneration(llava_config)
        twig_model = torch.nn.ModuleDict(
            {
                "layers": torch.nn.ModuleList(
                    LlamaDecoderLayer(text_config, layer_idx=i) for i in range(config.num_twig_layers)
                ),
                "norm": LlamaRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps),
                "lm_head": torch.nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False),
            }
        )
    llava = load_into(llava, base, "", dtype, device)
    twig_model = load_into(twig_model, twig, "model.twig.", dtype, device)

    outputs = llava(**inputs, output_hidden_states=True)
    hidden_states = outputs.hidden_states[config.twig_attach_layer]
    position_ids = torch.arange(hidden_states.shape[1], device=device)[None]
    position_embeddings = llava.model.language_model.rotary_emb(hidden_states, position_ids)
    for layer in twig_model["layers"]:  # no mask: SDPA then applies the causal one
        hidden_states = layer(hidden_states, attention_mask=None, position_embeddings=position_embeddings)
    twig_logits = twig_model["lm_head"](twig_model["norm"](hidden_states))
    return outputs.logits.float().cpu(), twig_logits.float().cpu()


@torch.no_grad()
def converted_logits(folder, inputs: BatchFeature, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The written folder's base logits (no token pruning, to compare every position) and its twig's logits."""
    model = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=dtype, attn_implementation=ATTENTION
    ).to(device).eval()
    base = model(**inputs, token_reduction="none").logits
    twig = model.twig_forward(**inputs).logits
    return base.float().cpu(), twig.float().cpu()


def run_self_check(
    folder,
    config: TwigVLMConfig,
    tensors: dict[str, TensorSource],
    processor: ProcessorMixin,
    dtype: torch.dtype,
    device: str,
) -> SelfCheckReport:
    inputs = probe_inputs(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    inputs = inputs.to(device)
    reference_base, reference_twig = reference_logits(config, tensors, inputs, dtype, device)
    gc.collect()  # the reference is gone before the converted model loads: one model in memory at a time
    base, twig = converted_logits(folder, inputs, dtype, device)
    return SelfCheckReport(
        dtype=dtype,
        device=device,
        num_probe_tokens=inputs["input_ids"].shape[1],
        base_max_difference=(base - reference_base).abs().max().item(),
        twig_max_difference=(twig - reference_twig).abs().max().item(),
        base_logit_scale=reference_base.abs().max().item(),
        twig_logit_scale=reference_twig.abs().max().item(),
        same_next_token=bool(base[0, -1].argmax() == reference_base[0, -1].argmax()),
    )
