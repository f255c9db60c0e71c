"""TwigVLM-HF. The modules beside this file are the remote code a checkpoint ships; this file is not shipped."""

from .configuration_twigvlm import TwigVLMConfig


__all__ = ["TwigVLMConfig"]
