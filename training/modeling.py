"""The twig-training forward: the twig's next-token loss, optionally with TwigVLM++ stage-1 distillation."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import ModelOutput

from twigvlm import TwigVLMForConditionalGeneration

from .data import IGNORE_INDEX


@dataclass
class TwigTrainingOutput(ModelOutput):
    """
    loss: next-token loss plus α·distillation loss, each summed over the supervised tokens and divided by their count
    in the whole (accumulated) batch. logits: the twig's logits at the supervised positions (`[N, vocab]`), or at
    every position (`[batch, length, vocab]`) without labels.
    """

    loss: torch.Tensor | None = None
    ntp_loss: torch.Tensor | None = None
    distill_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """
    Per token τ²·KL(p_teacher ‖ p_student) with p = softmax(logits / τ): the paper's PredKL (TwigVLM++ Eq. 10), the
    base model's prediction distilled into the twig. No clipping (the stage-1 release clips each token's KL at 4 and
    divides by 4; the paper's formula has neither). Shape `[N]` for logits `[N, vocab]`.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * temperature**2


class TwigVLMForTwigTraining(TwigVLMForConditionalGeneration):
    """
    TwigVLM whose forward trains the twig on the frozen base (twigvlm-method.md §4): it runs the vision tower, base
    layers 0..K-1 and the twig — never base layers ≥ K — and returns the twig's next-token loss. With
    `distill_alpha > 0` it adds TwigVLM++'s PredKL (§6) against the full base model, run without a graph.

    Same weights and names as [`TwigVLMForConditionalGeneration`]; the forward is the only difference, so that
    Trainer, DeepSpeed and FSDP wrap and call it like any model. Not shipped with checkpoints.
    """

    # The forward normalises its loss by `num_items_in_batch`, the supervised tokens of the whole accumulated batch.
    accepts_loss_kwargs = True
    distill_alpha: float = 0.0
    distill_temperature: float = 5.0

    def freeze_base(self) -> None:
        """Only the twig learns: the base gets no gradients, so the optimizer sees the twig alone."""
        self.requires_grad_(False)
        self.model.twig.requires_grad_(True)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> TwigTrainingOutput:
        with torch.no_grad():  # the frozen vision tower and projector keep no activations
            inputs_embeds, *_ = self.model.embed_inputs(input_ids, None, pixel_values, None)
        twig_hidden = self.model.twig_forward(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask
        ).last_hidden_state
        if labels is None:
            return TwigTrainingOutput(logits=self.model.twig.lm_head(twig_hidden))

        # Logits only where a next token is supervised (the answers): the vocabulary-sized tensors stay small.
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = self.model.twig.lm_head(twig_hidden[:, :-1][supervised]).float()
        if num_items_in_batch is None:
            num_items_in_batch = supervised.sum()
        num_items = torch.as_tensor(num_items_in_batch, device=logits.device).clamp(min=1)
        ntp_loss = F.cross_entropy(logits, targets[supervised], reduction="sum") / num_items
        loss, distill_loss = ntp_loss, None
        if self.distill_alpha > 0:
            with (
                torch.no_grad()
            ):  # the teacher: the full base model on every token, as the inference model computes it
                base_hidden = self.model.language_model(
                    inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
                teacher_logits = self.lm_head(base_hidden[:, :-1][supervised])
            distill_loss = distillation_kl(logits, teacher_logits, self.distill_temperature).sum() / num_items
            loss = ntp_loss + self.distill_alpha * distill_loss
        return TwigTrainingOutput(loss=loss, ntp_loss=ntp_loss.detach(), distill_loss=distill_loss, logits=logits)
