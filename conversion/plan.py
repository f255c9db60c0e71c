"""
Which input tensor becomes which output tensor, checked before anything is written.

Every output tensor has exactly one source, every input tensor is used or covered by a documented exception, and
every shape fits; the only change of shape allowed is appending vocabulary rows (see `VOCAB_TENSORS`).
"""

from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from transformers import PretrainedConfig, PreTrainedModel

from .checkpoint import Checkpoint, CheckpointError
from .layouts import Layout


# The matrices with a row per token, the only tensors whose shape may change, and only as `check_complete` allows: a
# conversion appends rows for tokens the input lacks (`<image>`, padding to a multiple), the mean of the existing rows
# (the `<image>` embedding is always replaced by image features, and generation never emits the new tokens, so their
# values only need to be harmless and reproducible); exporting the twig in its authors' layout cuts them off again.
VOCAB_TENSORS = ("model.language_model.embed_tokens.weight", "lm_head.weight", "model.twig.lm_head.weight")
MAX_NAMES_IN_ERROR = 12


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it comes from and the shape it must have."""

    checkpoint: Checkpoint
    source_name: str
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        tensor = self.checkpoint.load(self.source_name)[: self.shape[0]]
        missing_rows = self.shape[0] - tensor.shape[0]
        if missing_rows:  # in float32, so that the new rows do not depend on the input's dtype
            tensor = tensor.float()
            tensor = torch.cat([tensor, tensor.mean(dim=0, keepdim=True).expand(missing_rows, -1)])
        return tensor

    def describe(self) -> str:
        return f"{self.source_name} of the {self.checkpoint.label}"


def expected_shapes(model_class: type[PreTrainedModel], config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The output's tensor names and shapes, read off the model class itself, built without memory (meta device)."""
    with init_empty_weights():
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def name_list(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    return shown + (f" and {len(names) - MAX_NAMES_IN_ERROR} more" if len(names) > MAX_NAMES_IN_ERROR else "")


def plan_tensors(
    expected_shapes: dict[str, tuple[int, ...]], inputs: list[tuple[Checkpoint, Layout]]
) -> dict[str, PlannedTensor]:
    """
    Map the inputs' tensors onto `expected_shapes` (the output model's names and shapes). Output names the inputs do
    not provide are left out of the result, for the caller to derive (a grown twig) or report with `check_complete`.
    """
    plan: dict[str, PlannedTensor] = {}
    for checkpoint, layout in inputs:
        unknown = []
        for source_name in checkpoint.names():
            target = layout.target_name(source_name)
            if target is None or target not in expected_shapes:
                if layout.ignore_reason(source_name) is None:
                    unknown.append(source_name if target is None else f"{source_name} (would be {target})")
                continue
            if target in plan:
                raise CheckpointError(
                    f"{target} is provided twice: by {plan[target].describe()} and by {source_name} of the "
                    f"{checkpoint.label}."
                )
            plan[target] = PlannedTensor(checkpoint, source_name, expected_shapes[target])
        if unknown:
            raise CheckpointError(
                f"The {checkpoint.label} ({layout.name} layout) holds tensors this conversion does not know, so it "
                f"would silently drop them: {name_list(unknown)}. Is it the right checkpoint for this input?"
            )
    return plan


def check_complete(
    plan: dict[str, PlannedTensor], expected_shapes: dict[str, tuple[int, ...]], vocab_rows: str = "append"
) -> None:
    """
    Every output tensor has a source, and every source has the output's shape, but for vocabulary rows that
    `vocab_rows` allows: "append" (the output has more) or "cut" (the output has fewer).
    """
    missing = [name for name in expected_shapes if name not in plan]
    if missing:
        raise CheckpointError(f"No input provides these tensors of the TwigVLM model: {name_list(missing)}.")
    for target, planned in plan.items():
        source_shape = planned.checkpoint.shape(planned.source_name)
        if source_shape == planned.shape:
            continue
        row_change = {"append": source_shape[0] < planned.shape[0], "cut": source_shape[0] > planned.shape[0]}[vocab_rows]
        if target in VOCAB_TENSORS and source_shape[1:] == planned.shape[1:] and row_change:
            continue
        raise CheckpointError(
            f"Shape mismatch: {planned.describe()} has shape {tuple(source_shape)}, but {target} needs "
            f"{tuple(planned.shape)} for this base model. The inputs do not belong together (e.g. a twig trained "
            "on another base model)."
        )
