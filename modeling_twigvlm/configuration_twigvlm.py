"""Configuration of TwigVLM: a LLaVA model with a twig grown on an early layer of its language model."""

import math

from huggingface_hub.dataclasses import strict
from transformers.models.llava.configuration_llava import LlavaConfig


# The visual-token reductions a forward can apply (see `token_reduction_twigvlm.py`): TwigVLM's own, none, and the
# methods it is compared against.
TOKEN_REDUCTIONS = (
    "twig",
    "none",
    "fastv",
    "sparsevlm",
    "visionzip",
    "fastervlm",
    "illava",
    "mustdrop",
    "random",
    "pooling",
)
# Every Auto class a TwigVLM checkpoint answers to; `save_pretrained` writes this into config.json.
AUTO_MAP = {
    "AutoConfig": "configuration_twigvlm.TwigVLMConfig",
    "AutoModel": "modeling_twigvlm.TwigVLMModel",
    "AutoModelForImageTextToText": "modeling_twigvlm.TwigVLMForConditionalGeneration",
}


@strict
class TwigVLMConfig(LlavaConfig):
    r"""
    Everything of [`LlavaConfig`] plus the twig and its token pruning.

    Args:
        twig_attach_layer (`int`, *optional*, defaults to 2):
            K: the twig reads the hidden states entering base layer K (after base layers 0..K-1).
            Visual tokens are pruned from layer K on.
        num_twig_layers (`int`, *optional*, defaults to 3):
            T: decoder layers in the twig, initialised from base layers K..K+T-1.
        final_wipe_layer (`int`, *optional*, defaults to 24):
            F: every remaining visual token is dropped before base layer F ("FinalWipe"). `None` keeps
            the pruned set up to the last layer (F = L).
        visual_token_budget (`int` or `float`, *optional*, defaults to 64):
            R̄: the average number of visual tokens per base layer, as the paper counts budgets
            (64 / 128 / 192 for LLaVA-1.5). Turned into R by [`~TwigVLMConfig.num_kept_for_budget`].
        num_kept_visual_tokens (`int`, *optional*):
            R: visual tokens kept for layers K..F-1, set directly. Wins over `visual_token_budget`.
        token_reduction (`str`, *optional*, defaults to `"twig"`):
            `"twig"` prunes with the twig's attention (TTP); `"none"` keeps every visual token; the other names in
            `TOKEN_REDUCTIONS` (`"fastv"`, `"visionzip"`, ...) run the methods TwigVLM is compared against.
    """

    model_type = "twigvlm"

    twig_attach_layer: int = 2
    num_twig_layers: int = 3
    final_wipe_layer: int | None = 24
    visual_token_budget: int | float | None = 64
    num_kept_visual_tokens: int | None = None
    token_reduction: str = "twig"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # A checkpoint's own auto_map (e.g. "owner/repo--modeling_twigvlm...") wins over the local module names.
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def num_base_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def drop_layer(self) -> int:
        """The first base layer that sees no visual token: F, or L without FinalWipe."""
        return self.num_base_layers if self.final_wipe_layer is None else self.final_wipe_layer

    def validate_twig(self):
        """Part of `@strict` validation: the twig and the pruning must fit the base model."""
        num_layers = self.num_base_layers
        k, t = self.twig_attach_layer, self.num_twig_layers
        if not 0 < k < num_layers:
            raise ValueError(f"twig_attach_layer={k} must lie in 1..{num_layers - 1} (the base has {num_layers} layers).")
        if not 1 <= t <= num_layers - k:
            raise ValueError(
                f"num_twig_layers={t} must lie in 1..{num_layers - k}: twig_attach_layer + num_twig_layers "
                f"({k} + {t}) may not exceed the {num_layers} base layers it is initialised from."
            )
        if self.final_wipe_layer is not None and not k < self.final_wipe_layer <= num_layers:
            raise ValueError(
                f"final_wipe_layer={self.final_wipe_layer} must lie in {k + 1}..{num_layers} "
                f"(after twig_attach_layer={k}), or be None for no FinalWipe."
            )
        check_budgets(self.visual_token_budget, self.num_kept_visual_tokens)
        check_token_reduction(self.token_reduction)

    def num_kept_for_budget(self, visual_token_budget: float, num_visual_tokens: int) -> int:
        """R for an average budget R̄, inverting R̄ = (K·M + R·(F − K)) / L with `ceil` as the released code does.

        A budget of M or more keeps every visual token. A budget below K·M / L cannot be met, since layers
        0..K-1 always see all M visual tokens, and raises.
        """
        k, num_layers, m = self.twig_attach_layer, self.num_base_layers, num_visual_tokens
        kept = math.ceil((num_layers * visual_token_budget - k * m) / (self.drop_layer - k))
        if kept < 0:
            raise ValueError(
                f"visual_token_budget={visual_token_budget} is below {k * m / num_layers:g}, the least average "
                f"reachable when layers 0..{k - 1} see all {m} visual tokens of {num_layers} layers; raise the "
                "budget or set num_kept_visual_tokens=0 to drop every visual token from the twig layer on."
            )
        return min(kept, m)


def check_budgets(visual_token_budget: float | None, num_kept_visual_tokens: int | None) -> None:
    if visual_token_budget is not None and visual_token_budget < 0:
        raise ValueError(f"visual_token_budget={visual_token_budget} must be >= 0 (average visual tokens per layer).")
    if num_kept_visual_tokens is not None and num_kept_visual_tokens < 0:
        raise ValueError(f"num_kept_visual_tokens={num_kept_visual_tokens} must be >= 0.")


def check_token_reduction(token_reduction: str) -> None:
    if token_reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduction={token_reduction!r} is unknown; choose one of {', '.join(TOKEN_REDUCTIONS)}.")


__all__ = ["TwigVLMConfig"]
