"""Trainer, arguments and outputs of twig training: transformers' Trainer, so accelerate, DeepSpeed and FSDP apply."""

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from transformers import ProcessorMixin, Trainer, TrainingArguments
from transformers.dynamic_module_utils import custom_object_save
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration
from twigvlm.conversion.layouts import TWIGVLM_TWIG_LAYOUT

from .data import ModalityLengthGroupedSampler
from .grow import TWIG_PREFIX
from .modeling import TwigVLMForTwigTraining


logger = logging.get_logger(__name__)

TWIG_WEIGHTS_NAME = "twig.safetensors"
AUTHORS_LAYOUT_DIR = "twig_authors_layout"
FULL_MODEL_DIR = "twigvlm"


@dataclass
class TwigTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with the paper's recipe as defaults (twigvlm-method.md §4), and the twig's."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (paper: 1e-4)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Linear warm-up: steps, or a fraction of all steps below 1 (paper: 0.03)."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the data (paper: 1)."})
    adam_beta2: float = field(
        default=0.98,
        metadata={
            "help": "AdamW's beta2. The paper's recipe (Table 6) uses 0.98, the default here; the authors' released "
            "train_twig.sh left transformers' default 0.999: pass --adam_beta2 0.999 to reproduce that script."
        },
    )
    bf16: bool = field(default=True, metadata={"help": "bfloat16 mixed precision (paper: bf16)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch per device (authors' script: 4)."})
    global_batch_size: int = field(
        default=128,
        metadata={
            "help": "Records per optimizer step over all devices (paper: 128); sets gradient_accumulation_steps to "
            "global_batch_size / (per_device_train_batch_size x devices). 0 keeps --gradient_accumulation_steps."
        },
    )
    group_by_modality_length: bool = field(
        default=True,
        metadata={"help": "Batches of image records or of text records, of similar lengths, as LLaVA trains."},
    )
    distill: bool = field(
        default=False,
        metadata={
            "help": "Add TwigVLM++ stage-1 distillation: loss = next-token loss + alpha x T^2 x KL(base || twig) at "
            "temperature T on answer tokens (paper Eq. 9-11, PredKL only; the P-Head's AttnKL is not part of this)."
        },
    )
    distill_alpha: float = field(default=0.1, metadata={"help": "Weight alpha of the distillation loss (paper: 0.1)."})
    distill_temperature: float = field(default=5.0, metadata={"help": "Distillation temperature (stage-1 code: 5)."})
    save_authors_layout: bool = field(
        default=False,
        metadata={"help": f"Also write the twig in the authors' release layout to {AUTHORS_LAYOUT_DIR}/."},
    )
    save_full_model: bool = field(
        default=False,
        metadata={"help": f"Also write the whole TwigVLM with its processor to {FULL_MODEL_DIR}/, ready for the Hub."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every this many steps."})
    save_steps: float = field(default=500, metadata={"help": "Save a (twig-only) checkpoint every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every field the collator returns."})

    def __post_init__(self):
        # Before the parent's __post_init__, which hands the batch sizes to a DeepSpeed config.
        devices = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = self.per_device_train_batch_size * devices
        if self.global_batch_size:
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"global_batch_size={self.global_batch_size} is not a multiple of per_device_train_batch_size="
                    f"{self.per_device_train_batch_size} x {devices} device(s); change one of them."
                )
            accumulation = self.global_batch_size // per_step
            if self.gradient_accumulation_steps not in (1, accumulation):
                raise ValueError(
                    f"gradient_accumulation_steps={self.gradient_accumulation_steps} contradicts global_batch_size="
                    f"{self.global_batch_size} (which needs {accumulation}); pass --global_batch_size 0 to use "
                    "gradient_accumulation_steps as given."
                )
            self.gradient_accumulation_steps = accumulation
        super().__post_init__()


class TwigTrainer(Trainer):
    """
    Trainer for [`TwigVLMForTwigTraining`]: freezes the base, groups batches by modality length, logs the distillation
    loss apart, and writes twig-only checkpoints (the frozen base is reloaded from its source on resume).
    """

    def __init__(self, model: TwigVLMForTwigTraining, args: TwigTrainingArguments, **kwargs):
        model.freeze_base()
        model.distill_alpha = args.distill_alpha if args.distill else 0.0
        model.distill_temperature = args.distill_temperature
        super().__init__(model=model, args=args, **kwargs)
        self.loss_parts: dict[str, torch.Tensor] = {}
        self.loss_parts_micro_steps = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not (self.args.group_by_modality_length and hasattr(dataset, "modality_lengths")):
            return super()._get_train_sampler(dataset)
        lengths, has_image = dataset.modality_lengths()
        group_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ModalityLengthGroupedSampler(lengths, has_image, group_size, seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and outputs.distill_loss is not None:
            # Scaled as the Trainer scales the loss: normalised by all devices' tokens, whose gradients it averages.
            for name in ("ntp_loss", "distill_loss"):
                part = outputs[name].detach() * self.accelerator.num_processes
                self.loss_parts[name] = self.loss_parts.get(name, 0.0) + part
            self.loss_parts_micro_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """With distillation, the next-token and distillation losses are logged beside their sum."""
        if "loss" in logs and self.loss_parts:
            # Each micro-batch holds its share of one step's loss: a step's loss sums its accumulated micro-batches.
            steps = self.loss_parts_micro_steps / self.args.gradient_accumulation_steps
            for name, total in self.loss_parts.items():
                logs[name] = self.accelerator.gather(total.reshape(1)).mean().item() / steps
            self.loss_parts, self.loss_parts_micro_steps = {}, 0
        super().log(logs, start_time)

    def shards_parameters(self) -> bool:
        return self.is_fsdp_enabled or is_deepspeed_zero3_enabled()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Unless parameters are sharded, the twig is taken from the model itself, without a copy of the whole state."""
        if self.shards_parameters():
            super().save_model(output_dir, _internal_call)
        else:
            self._save(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold the twig alone (in its training precision), the optimizer and the trainer state."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        os.makedirs(output_dir, exist_ok=True)
        twig = {name: tensor.contiguous() for name, tensor in state_dict.items() if name.startswith(TWIG_PREFIX)}
        safetensors.torch.save_file(twig, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _issue_warnings_after_load(self, load_result) -> None:
        """Resuming loads a twig-only checkpoint: the base is expected to be missing, the twig is not."""
        missing = [key for key in load_result.missing_keys if key.startswith(TWIG_PREFIX)]
        if missing or load_result.unexpected_keys:
            raise ValueError(
                f"The checkpoint does not fit this twig: missing {missing[:5]}, unexpected "
                f"{load_result.unexpected_keys[:5]}."
            )

    def save_twig(self, output_dir: str | os.PathLike, processor: ProcessorMixin | None = None) -> None:
        """
        Final outputs, in the training precision: `twig.safetensors` (our layout, `model.twig.*`); with
        `save_authors_layout` the authors' release layout; with `save_full_model` the whole TwigVLM with `processor`.
        Call on every process: gathering sharded weights (ZeRO-3, FSDP) is collective.
        """
        model = self.accelerator.unwrap_model(self.model)
        if self.shards_parameters():
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        else:
            state_dict = model.state_dict()
        if not self.args.should_save:
            return
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        config = model.config
        twig = {
            name: tensor.to(dtype).contiguous() for name, tensor in state_dict.items() if name.startswith(TWIG_PREFIX)
        }
        metadata = {
            "format": "pt",
            "twig_attach_layer": str(config.twig_attach_layer),
            "num_twig_layers": str(config.num_twig_layers),
            "base_model": str(config.name_or_path),
        }
        safetensors.torch.save_file(twig, output_dir / TWIG_WEIGHTS_NAME, metadata=metadata)
        (output_dir / "twig_config.json").write_text(json.dumps({**metadata, "dtype": str(dtype)}, indent=2) + "\n")
        if self.args.save_authors_layout:
            (output_dir / AUTHORS_LAYOUT_DIR).mkdir(exist_ok=True)
            safetensors.torch.save_file(
                to_authors_layout(twig, config),
                output_dir / AUTHORS_LAYOUT_DIR / "model.safetensors",
                metadata={"format": "pt"},
            )
        if self.args.save_full_model:
            save_full_twigvlm(model, state_dict, output_dir / FULL_MODEL_DIR, dtype, processor)


def to_authors_layout(twig: dict[str, torch.Tensor], config: TwigVLMConfig) -> dict[str, torch.Tensor]:
    """
    The twig under the authors' release names (twigvlm-method.md §4): `model.layers.{0..T-1}.*`, `model.norm.weight`
    and `lm_head.weight` over the original vocabulary, as conversion exports it (the rows LLaVA added are cut off).
    """
    authors = {TWIGVLM_TWIG_LAYOUT.target_name(name): tensor for name, tensor in twig.items()}
    authors["lm_head.weight"] = authors["lm_head.weight"][: config.image_token_index].contiguous()
    return authors


@dataclass(frozen=True)
class LoadedTensor:
    """A tensor already in memory, as conversion's writer takes its inputs (shape known, loaded on demand)."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def load(self) -> torch.Tensor:
        return self.tensor


def save_full_twigvlm(
    model: TwigVLMForConditionalGeneration,
    state_dict: dict[str, torch.Tensor],
    output_dir: Path,
    dtype: torch.dtype,
    processor: ProcessorMixin | None = None,
) -> None:
    """
    A Hub-ready TwigVLM folder written as conversion writes one: sharded safetensors placed only once complete, the
    config with its remote code, the generation config (self-speculative decoding on, LLaVA's added tokens
    suppressed) and the processor. The model card of conversion describes a conversion, so none is written.
    """
    # Conversion's builder brings its whole stack (model card, self-check), needed only for this output.
    from twigvlm.conversion.build import twigvlm_generation_config
    from twigvlm.conversion.inputs import TOKEN_ID_FIELDS
    from twigvlm.conversion.writer import staged_folder, write_safetensors

    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.architectures = [TwigVLMForConditionalGeneration.__name__]
    token_ids = {field: getattr(model.generation_config, field) for field in TOKEN_ID_FIELDS}
    with staged_folder(output_dir, overwrite=True) as folder:
        tensors = {name: LoadedTensor(tensor) for name, tensor in state_dict.items()}
        write_safetensors(folder, tensors, dtype, max_shard_size="5GB")
        config.save_pretrained(folder)
        custom_object_save(TwigVLMForConditionalGeneration, folder)
        twigvlm_generation_config(config, token_ids).save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
