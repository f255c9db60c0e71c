"""What one generation did to the visual tokens and how its drafting went, as plain numbers for logs and displays."""

from typing import Any


def pruning_record(cache, num_layers: int) -> dict[str, Any]:
    """
    Visual tokens per layer group of the prefill (`[first_layer, end_layer, n]`), the image tokens M and the average
    per layer that resulted, which is how the TwigVLM paper counts a budget (R̄ = 64 / 128 / 192).
    """
    groups = [[int(first), int(end), int(n)] for first, end, n in getattr(cache, "visual_token_counts", [])]
    if not groups:
        return {"visual_tokens": 0, "kept_visual_tokens": [], "mean_visual_tokens_per_layer": 0.0}
    return {
        "visual_tokens": groups[0][2],
        "kept_visual_tokens": groups,
        "mean_visual_tokens_per_layer": sum((end - first) * n for first, end, n in groups) / num_layers,
    }


def speculation_record(cache) -> dict[str, Any]:
    """Self-speculative decoding's rounds, drafted and accepted tokens; empty when the call did not draft."""
    stats = getattr(cache, "speculation_stats", None)
    if stats is None:
        return {}
    return {
        "draft_rounds": stats.rounds,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
    }
