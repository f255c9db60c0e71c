"""TwigVLM-HF. The modules beside this file are the remote code a checkpoint ships; this file is not shipped."""

from .cache_twigvlm import TwigVLMCache
from .compat_twigvlm import output_cache, output_image_features
from .configuration_twigvlm import TwigVLMConfig
from .modeling_twigvlm import TwigVLMForConditionalGeneration, TwigVLMModel, TwigVLMPreTrainedModel


# `save_pretrained` copies the code of registered classes next to the weights and writes `auto_map`.
TwigVLMConfig.register_for_auto_class("AutoConfig")
TwigVLMModel.register_for_auto_class("AutoModel")
TwigVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "TwigVLMCache",
    "TwigVLMConfig",
    "TwigVLMForConditionalGeneration",
    "TwigVLMModel",
    "TwigVLMPreTrainedModel",
    "output_cache",
    "output_image_features",
]
