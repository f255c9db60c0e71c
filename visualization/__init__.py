"""Pictures of which visual tokens each token-reduction method keeps (and, for merging methods, merges)."""

from .kept_tokens import KeptPatches, draw_kept_patches, find_kept_patches, model_view, show_kept


__all__ = ["KeptPatches", "draw_kept_patches", "find_kept_patches", "model_view", "show_kept"]
