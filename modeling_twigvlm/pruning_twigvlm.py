"""Twig-guided token pruning (TTP): how many visual tokens to keep, and which."""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .configuration_twigvlm import check_budgets, check_token_reduction


def resolve_budget(
    config, visual_token_budget: float | None = None, num_kept_visual_tokens: int | None = None
) -> tuple[float | None, int | None]:
    """This call's R̄ or R if given (not both), else the config's."""
    if visual_token_budget is not None and num_kept_visual_tokens is not None:
        raise ValueError(
            "Pass either visual_token_budget (the average R̄ per layer) or num_kept_visual_tokens (R), not both."
        )
    check_budgets(visual_token_budget, num_kept_visual_tokens)
    if visual_token_budget is None and num_kept_visual_tokens is None:
        return config.visual_token_budget, config.num_kept_visual_tokens
    return visual_token_budget, num_kept_visual_tokens


def resolve_num_kept_visual_tokens(
    config,
    num_visual_tokens: int,
    visual_token_budget: float | None = None,
    num_kept_visual_tokens: int | None = None,
) -> int:
    """R for this call: the call's R or R̄ if given (not both), else the config's; R never exceeds M."""
    visual_token_budget, num_kept_visual_tokens = resolve_budget(config, visual_token_budget, num_kept_visual_tokens)
    if num_kept_visual_tokens is not None:
        return min(num_kept_visual_tokens, num_visual_tokens)
    if visual_token_budget is None:
        raise ValueError("The config sets neither visual_token_budget nor num_kept_visual_tokens; set one of them.")
    return config.num_kept_for_budget(visual_token_budget, num_visual_tokens)


def resolve_token_reduction(config, token_reduction: str | None) -> str:
    token_reduction = config.token_reduction if token_reduction is None else token_reduction
    check_token_reduction(token_reduction)
    return token_reduction


def attention_rows(
    layer: nn.Module,
    query_hidden_states: torch.Tensor,
    keys: torch.Tensor,
    query_position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """
    Attention rows of chosen queries of a decoder layer, averaged over heads: `[batch, num_queries, num_keys]`.

    `query_hidden_states` are the layer's inputs at the queries, `keys` the layer's rotated keys as its cache holds them
    and `key_mask` (`[batch, num_queries, num_keys]`) the keys each query may see. Only these rows are computed, so the
    layer itself can run any attention backend. As in the released code of TwigVLM and FastV, the softmax is taken in
    float32 and cast back to the model's dtype before the mean over heads.
    """
    attention = layer.self_attn
    normed = layer.input_layernorm(query_hidden_states)
    query = attention.q_proj(normed).view(*normed.shape[:-1], -1, attention.head_dim).transpose(1, 2)
    cos, sin = query_position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    keys = repeat_kv(keys, attention.num_key_value_groups)
    logits = torch.matmul(query, keys.transpose(2, 3)) * attention.scaling
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None], torch.finfo(logits.dtype).min)
    probabilities = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return probabilities.mean(dim=1)


def last_token_attention(
    layer: nn.Module,
    last_hidden_states: torch.Tensor,
    keys: torch.Tensor,
    last_position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The attention row of the last query (it sees every key but padding), averaged over heads: `[batch, num_keys]`."""
    key_mask = None if key_padding_mask is None else key_padding_mask[:, None, :]
    return attention_rows(layer, last_hidden_states, keys, last_position_embeddings, key_mask)[:, -1]


def keep_top_visual_tokens(scores: torch.Tensor, image_token_mask: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Keep every non-visual token and the `num_kept` best-scored visual tokens of each row, in their original order."""
    visual_scores = scores.float().masked_fill(~image_token_mask, float("-inf"))
    top = visual_scores.topk(num_kept, dim=-1).indices
    return (~image_token_mask).scatter(1, top, True)


__all__ = []
