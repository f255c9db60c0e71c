"""Twig training: grow a twig on a frozen LLaVA and train it with the paper's recipe on transformers' Trainer."""

from .cli import DataArguments, ModelArguments, train
from .data import (
    BadRecordError,
    LlavaConversationDataset,
    ModalityLengthGroupedSampler,
    TwigDataCollator,
    vicuna_v1_prompt,
)
from .grow import grow_twig, load_model_for_training, twig_fields
from .modeling import TwigTrainingOutput, TwigVLMForTwigTraining, distillation_kl
from .trainer import TwigTrainer, TwigTrainingArguments, to_authors_layout


__all__ = [
    "BadRecordError",
    "DataArguments",
    "LlavaConversationDataset",
    "ModalityLengthGroupedSampler",
    "ModelArguments",
    "TwigDataCollator",
    "TwigTrainer",
    "TwigTrainingArguments",
    "TwigTrainingOutput",
    "TwigVLMForTwigTraining",
    "distillation_kl",
    "grow_twig",
    "load_model_for_training",
    "to_authors_layout",
    "train",
    "twig_fields",
    "vicuna_v1_prompt",
]
