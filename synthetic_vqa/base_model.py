"""The small LLaVA trained here from scratch: its sizes (a CPU and a GPU recipe) and its end-to-end training."""

import os
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Trainer, TrainingArguments

from twigvlm.training.data import LlavaConversationDataset, TwigDataCollator


@dataclass(frozen=True)
class Recipe:
    """Sizes and training settings. K, T and F keep the paper's proportions at this depth (K/L ≤ 1/9, F/L = 3/4)."""

    name: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    twig_attach_layer: int
    num_twig_layers: int
    final_wipe_layer: int
    train_scenes: int  # first phase: the short questions in random order, the description last
    base_epochs: float
    base_learning_rate: float
    continued_scenes: int  # second phase, on further scenes: the description at any turn, as often asked first
    continued_learning_rate: float
    twig_epochs: float
    twig_learning_rate: float
    batch_size: int

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


RECIPES = {
    # 144 image tokens; a few hours of two CPU cores in all, most of it the base model.
    "cpu": Recipe(
        "cpu", image_size=96, patch_size=8, vision_hidden=128, vision_layers=4, text_hidden=192, text_intermediate=512,
        text_layers=12, text_heads=6, twig_attach_layer=1, num_twig_layers=2, final_wipe_layer=9, train_scenes=20000,
        base_epochs=1.0, base_learning_rate=1e-3, continued_scenes=8000, continued_learning_rate=5e-4, twig_epochs=0.5, twig_learning_rate=1e-3, batch_size=16,
    ),
    # Seconds: only for checking that every stage runs (the suite runs it); it learns little.
    "tiny": Recipe(
        "tiny", image_size=48, patch_size=8, vision_hidden=32, vision_layers=3, text_hidden=32, text_intermediate=64,
        text_layers=12, text_heads=2, twig_attach_layer=1, num_twig_layers=2, final_wipe_layer=9, train_scenes=16,
        base_epochs=1.0, base_learning_rate=1e-3, continued_scenes=8, continued_learning_rate=5e-4, twig_epochs=1.0, twig_learning_rate=1e-3, batch_size=8,
    ),
    # LLaVA-1.5's 336-pixel, 576-token images; minutes on one H100.
    "gpu": Recipe(
        "gpu", image_size=336, patch_size=14, vision_hidden=256, vision_layers=6, text_hidden=384,
        text_intermediate=1024, text_layers=12, text_heads=6, twig_attach_layer=1, num_twig_layers=2,
        final_wipe_layer=9, train_scenes=60000, base_epochs=2.0, base_learning_rate=6e-4, continued_scenes=20000,
        continued_learning_rate=3e-4, twig_epochs=1.0,
        twig_learning_rate=6e-4, batch_size=64,
    ),
}  # fmt: skip


def base_config(recipe: Recipe, processor: LlavaProcessor) -> LlavaConfig:
    """LLaVA-1.5's architecture at the recipe's size: CLIP ViT (penultimate layer, no CLS), 2-layer MLP, LLaMA."""
    tokenizer = processor.tokenizer
    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": recipe.vision_hidden,
            "intermediate_size": 4 * recipe.vision_hidden,
            "num_hidden_layers": recipe.vision_layers,
            "num_attention_heads": recipe.vision_hidden // 32,
            "image_size": recipe.image_size,
            "patch_size": recipe.patch_size,
            "projection_dim": recipe.vision_hidden,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": recipe.text_hidden,
            "intermediate_size": recipe.text_intermediate,
            "num_hidden_layers": recipe.text_layers,
            "num_attention_heads": recipe.text_heads,
            "num_key_value_heads": recipe.text_heads,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token),
        image_seq_length=recipe.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def train_base(
    recipe: Recipe,
    processor: LlavaProcessor,
    records: str | os.PathLike,
    image_folder: str | os.PathLike,
    output_dir: str | os.PathLike,
    learning_rate: float,
    start_from: str | os.PathLike | None = None,
    max_steps: int = -1,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """
    Trains the whole LLaVA (vision tower included), from scratch or from the checkpoint `start_from`, one epoch of
    `records` with a cosine schedule; saves it with `processor`.
    """
    torch.manual_seed(seed)
    if start_from is None:
        model = LlavaForConditionalGeneration(base_config(recipe, processor))
    else:
        model = LlavaForConditionalGeneration.from_pretrained(start_from, dtype=torch.float32)
    dataset = LlavaConversationDataset(records, processor, image_folder=image_folder)
    arguments = TrainingArguments(
        output_dir=os.fspath(output_dir),
        per_device_train_batch_size=recipe.batch_size,
        num_train_epochs=recipe.base_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.05,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=TwigDataCollator(processor.tokenizer.pad_token_id),
    )
    trainer.train()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return model
