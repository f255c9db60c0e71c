"""
The differences between the transformers versions TwigVLM supports (5.17 and newer): transformers 5.24 renamed the KV
cache from `past_key_values` to `cache` (forward arguments, model outputs, `generate`'s model kwargs) and moved LLaVA's
image features from `image_hidden_states` to the vision outputs, `image_outputs`.
"""

import torch
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast


# What this transformers calls the KV cache: pass it to layers and masks under this name, find it in outputs by it.
CACHE_NAME = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
# The field of LLaVA's outputs that holds the image features.
IMAGE_OUTPUTS_FIELD = (
    "image_outputs" if "image_outputs" in LlavaModelOutputWithPast.__dataclass_fields__ else "image_hidden_states"
)


def output_cache(output: ModelOutput) -> Cache | None:
    """The KV cache of a model's or `generate`'s output (`output.cache`, or `output.past_key_values` before 5.24)."""
    return getattr(output, CACHE_NAME)


def image_output_fields(
    image_outputs: BaseModelOutputWithPooling | None, image_features: torch.Tensor | None
) -> dict:
    """
    LLaVA's output field for the images that entered the language model, as this transformers names it: their vision
    outputs, or before 5.24 their features concatenated (`image_features`, `[tokens, hidden]`).
    """
    if IMAGE_OUTPUTS_FIELD == "image_outputs":
        return {"image_outputs": image_outputs}
    return {"image_hidden_states": image_features}


def output_image_features(output: ModelOutput) -> torch.Tensor | None:
    """The image features that entered the language model, all images' rows concatenated (`[tokens, hidden]`)."""
    if IMAGE_OUTPUTS_FIELD == "image_hidden_states":
        return output.image_hidden_states
    return None if output.image_outputs is None else torch.cat(list(output.image_outputs.pooler_output), dim=0)


__all__ = ["CACHE_NAME", "IMAGE_OUTPUTS_FIELD", "image_output_fields", "output_cache", "output_image_features"]
