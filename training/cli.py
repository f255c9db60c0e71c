"""`twigvlm-train`: grow a twig on a LLaVA-1.5-style model and train it with the paper's recipe."""

import os
from dataclasses import dataclass, field

import torch
from transformers import AutoProcessor, HfArgumentParser

from .data import LlavaConversationDataset, TwigDataCollator
from .grow import load_model_for_training, twig_fields
from .modeling import TwigVLMForTwigTraining
from .trainer import TwigTrainer, TwigTrainingArguments


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "A llava-hf LLaVA checkpoint (folder or Hub id, e.g. llava-hf/llava-1.5-7b-hf; a twig is grown "
            "from base layers K..K+T-1, norm and LM head) or a TwigVLM folder (its twig is trained further)."
        }
    )
    processor: str | None = field(default=None, metadata={"help": "Processor folder or id; default: the model's."})
    preset: str | None = field(
        default=None, metadata={"help": "Base-model preset for K, T, F (e.g. llava-v1.5-7b, llava-v1.5-13b)."}
    )
    twig_attach_layer: int | None = field(default=None, metadata={"help": "K (default: preset, else 2)."})
    num_twig_layers: int | None = field(default=None, metadata={"help": "T (default: preset, else 3)."})
    final_wipe_layer: int | None = field(
        default=None, metadata={"help": "F, an inference setting written to the config (default: preset, else 24)."}
    )
    grow: bool = field(default=False, metadata={"help": "Regrow the twig of a TwigVLM folder from its base."})
    base_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base: auto (float32 under FSDP, which needs one dtype per shard; else that "
            "of --bf16/--fp16), bfloat16, float16 or float32. The twig trains in float32.",
            "choices": ["auto", *DTYPES],
        },
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa, eager or flash_attention_2 (when installed)."}
    )


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA conversation JSON, e.g. llava_v1_5_mix665k.json."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the records' image paths are relative to."}
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens per record after image expansion (script: 2048)."})
    pad_to_square: bool = field(default=True, metadata={"help": "Pad images to a square first, as LLaVA-1.5 does."})
    skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Leave malformed records (missing image file, placeholder/image mismatch, empty conversation) out "
            "and count them in the log, instead of stopping with an error naming the first."
        },
    )


def base_dtype(model_args: ModelArguments, training_args: TwigTrainingArguments) -> torch.dtype:
    if model_args.base_dtype != "auto":
        return DTYPES[model_args.base_dtype]
    if training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return torch.float32
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TwigTrainingArguments) -> TwigTrainer:
    """Grow (or load) the twig, train it on the LLaVA conversation data, write the outputs; returns the trainer."""
    processor = AutoProcessor.from_pretrained(model_args.processor or model_args.model_name_or_path)
    fields = twig_fields(
        model_args.preset, model_args.twig_attach_layer, model_args.num_twig_layers, model_args.final_wipe_layer
    )
    model = load_model_for_training(
        model_args.model_name_or_path,
        model_class=TwigVLMForTwigTraining,
        grow=model_args.grow,
        dtype=base_dtype(model_args, training_args),
        attn_implementation=model_args.attn_implementation,
        **fields,
    )
    dataset = LlavaConversationDataset(
        data_args.data_path,
        processor,
        image_folder=data_args.image_folder,
        max_length=data_args.max_length,
        pad_to_square=data_args.pad_to_square,
        skip_bad_records=data_args.skip_bad_records,
    )
    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    trainer = TwigTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=TwigDataCollator(pad_token_id)
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("latest", "true", "True") else resume)
    trainer.save_twig(training_args.output_dir, processor)
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TwigTrainingArguments),
        description="Grow a twig on a frozen LLaVA-1.5-style model and train it (TwigVLM, arXiv 2503.14075): AdamW "
        "lr 1e-4, cosine, 3%% warm-up, 1 epoch, global batch 128, bf16 by default. Every transformers "
        "TrainingArguments option applies (--deepspeed, --gradient_checkpointing, --report_to, "
        "--resume_from_checkpoint PATH|latest, ...); launch with accelerate for several GPUs or nodes.",
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    train(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
