"""The KV cache of TwigVLM: the base model's layers, grouped by how many prompt tokens they kept, and the twig's."""

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class TwigVLMCache(DynamicCache):
    """
    A [`DynamicCache`] with the L base layers followed by the T twig layers (cache slots L..L+T-1).

    Token pruning in the prefill splits the base layers into groups `[0, K)`, `[K, F)`, `[F, L)` that hold different
    numbers of prompt tokens; every later token is appended to all of them, so the per-layer lengths that
    `DynamicCache` already tracks stay consistent and `crop(-n)` rolls every layer back alike. Layers 0..K-1 are never
    pruned, so `get_seq_length()` (layer 0) is the true sequence length `generate` expects.

    `kept_prompt_positions[start]` holds, for the group starting at base layer `start`, the prompt position each of its
    prompt slots stands for (`[batch, n]`), from which a padding mask over the whole sequence is cut down to that group.
    Other token reductions ([`token_reduction_twigvlm`]) choose their own groups (`group_starts` is set in the prefill);
    a slot of `-1` is left padding that a reduction added because rows kept different numbers of tokens, and a vision-side
    reduction records group 0 too, so its layer 0 holds fewer prompt tokens than the input had. `position_shifts[start]`
    (`[batch]`) is what a group subtracts from the caller's position ids when its reduction renumbered positions.
    """

    def __init__(self, config):
        text_config = config.get_text_config(decoder=True)
        super().__init__(config=text_config)
        self.layers.extend(DynamicLayer() for _ in range(config.num_twig_layers))
        self.num_base_layers = text_config.num_hidden_layers
        self.group_starts = sorted({0, config.twig_attach_layer, config.drop_layer} - {self.num_base_layers})
        # Whether the twig's KV is kept after the prefill (self-speculative drafting reads it); plain decoding frees it.
        self.keep_twig_cache = False
        self.prompt_length: int | None = None
        self.kept_prompt_positions: dict[int, torch.Tensor] = {}
        self.position_shifts: dict[int, torch.Tensor] = {}
        # For reductions that merge: per prompt position, the position of the kept token it joined (-1: none), by the
        # group where the merge happened (pictures of what was kept read it).
        self.merged_into_positions: dict[int, torch.Tensor] = {}
        # Which prompt positions (of the caller's input) are image tokens, to count what each group holds.
        self.prompt_image_mask: torch.Tensor | None = None
        # Per group `(first, end, visual tokens)`: the most any row holds, which is every row's count unless an adaptive
        # reduction kept different numbers per row (the per-row counts are in `token_reduction_report`).
        self.visual_token_counts: list[tuple[int, int, int]] = []
        self.token_reduction_report = None
        # Whether a reduction left-padded some group, so that decoding needs a padding mask even without one.
        self.has_padding_slots = False
        # Hidden states entering layer K of tokens the draft ran through layers 0..K-1, awaiting the verifier.
        self.draft_attach_hidden_states: torch.Tensor | None = None
        self.speculation_stats = None

    @property
    def layer_groups(self) -> list[tuple[int, int]]:
        """The base layers as `(first, end)` ranges that share one token set."""
        ends = self.group_starts[1:] + [self.num_base_layers]
        return list(zip(self.group_starts, ends))

    @property
    def twig_layer_indices(self) -> range:
        return range(self.num_base_layers, len(self.layers))

    def group_attention_mask(self, attention_mask: torch.Tensor | None, group_start: int) -> torch.Tensor | None:
        """Cut a 2D padding mask over the whole sequence (prompt + generated) down to the tokens a group holds."""
        kept = self.kept_prompt_positions.get(group_start)
        if attention_mask is None or kept is None:
            return attention_mask
        kept = kept.to(attention_mask.device)
        prompt_mask = attention_mask[:, : self.prompt_length].gather(1, kept.clamp(min=0)) * (kept >= 0)
        return torch.cat([prompt_mask, attention_mask[:, self.prompt_length :]], dim=1)

    def get_logical_length(self) -> int:
        """The sequence length as the caller counts it: layer 0's length plus the prompt tokens removed before it."""
        length = self.get_seq_length()
        if 0 in self.kept_prompt_positions:
            length += self.prompt_length - self.kept_prompt_positions[0].shape[1]
        return length

    def group_position_ids(self, position_ids: torch.Tensor, group_start: int) -> torch.Tensor:
        """The caller's position ids as a group counts them, after its reduction renumbered the prompt."""
        shift = self.position_shifts.get(group_start)
        return position_ids if shift is None else position_ids - shift.to(position_ids.device)[:, None]

    def count_visual_tokens(self) -> None:
        """Refresh `visual_token_counts` from the prompt positions each group holds."""
        self.visual_token_counts = []
        for start, end in self.layer_groups:
            kept = self.kept_prompt_positions.get(start)
            if self.prompt_image_mask is None:
                count = torch.zeros(1, dtype=torch.long)
            elif kept is None:
                count = self.prompt_image_mask.sum(dim=1)
            else:
                count = (self.prompt_image_mask.gather(1, kept.clamp(min=0)) & (kept >= 0)).sum(dim=1)
            self.visual_token_counts.append((start, end, int(count.max())))

    def restrict_prompt_tokens(
        self, first_layer: int, end_layer: int, kept_positions: torch.Tensor, position_shift: torch.Tensor | None
    ) -> None:
        """
        Keep, in base layers `first_layer..end_layer-1`, only the cached prompt tokens at `kept_positions` (a subset of
        what each of those layers holds, in its order), so that they decode like the layers that ran on that set.
        """
        for boundary in (first_layer, end_layer):
            if boundary < self.num_base_layers and boundary not in self.group_starts:
                parent = max(start for start in self.group_starts if start < boundary)
                self.group_starts = sorted([*self.group_starts, boundary])
                if parent in self.kept_prompt_positions:
                    self.kept_prompt_positions[boundary] = self.kept_prompt_positions[parent]
                if parent in self.position_shifts:
                    self.position_shifts[boundary] = self.position_shifts[parent]
        batch_size = kept_positions.shape[0]
        for start, end in self.layer_groups:
            if not first_layer <= start < end_layer:
                continue
            held = self.kept_prompt_positions.get(start)
            if held is None:
                held = torch.arange(self.prompt_length, device=kept_positions.device).expand(batch_size, -1)
            matches = (held[:, None, :] == kept_positions[:, :, None]) & (kept_positions >= 0)[:, :, None]
            slots = matches.int().argmax(dim=-1)  # a padding slot reads slot 0; the group's mask hides it
            for layer in self.layers[start:end]:
                index = slots[:, None, :, None].to(layer.keys.device)
                layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
                layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
            self.kept_prompt_positions[start] = kept_positions
            if position_shift is None:
                self.position_shifts.pop(start, None)
            else:
                self.position_shifts[start] = position_shift
        self._merge_equal_groups()

    def _merge_equal_groups(self) -> None:
        """Neighbouring groups that hold the same tokens at the same positions become one (one mask for both)."""
        merged = [self.group_starts[0]]
        for start in self.group_starts[1:]:
            previous = merged[-1]
            same_tokens = self._same(self.kept_prompt_positions.get(previous), self.kept_prompt_positions.get(start))
            same_positions = self._same(self.position_shifts.get(previous), self.position_shifts.get(start))
            if same_tokens and same_positions:
                self.kept_prompt_positions.pop(start, None)
                self.position_shifts.pop(start, None)
            else:
                merged.append(start)
        self.group_starts = merged

    @staticmethod
    def _same(first: torch.Tensor | None, second: torch.Tensor | None) -> bool:
        if first is None or second is None:
            return first is second
        return first.shape == second.shape and bool((first == second).all())

    def add_draft_attach_hidden_states(self, hidden_states: torch.Tensor) -> None:
        pending = self.draft_attach_hidden_states
        self.draft_attach_hidden_states = hidden_states if pending is None else torch.cat([pending, hidden_states], 1)

    def pop_draft_attach_hidden_states(self) -> torch.Tensor | None:
        pending, self.draft_attach_hidden_states = self.draft_attach_hidden_states, None
        return pending

    def free_twig(self) -> None:
        # Fresh layers rather than `reset()`, which zeroes the tensors in place on older transformers.
        for layer_idx in self.twig_layer_indices:
            self.layers[layer_idx] = DynamicLayer()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_to_rows(lambda rows: rows.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._apply_to_rows(lambda rows: rows[indices])

    def _apply_to_rows(self, function) -> None:
        self.kept_prompt_positions = {start: function(kept) for start, kept in self.kept_prompt_positions.items()}
        self.position_shifts = {start: function(shift) for start, shift in self.position_shifts.items()}
        self.merged_into_positions = {start: function(merged) for start, merged in self.merged_into_positions.items()}
        if self.prompt_image_mask is not None:
            self.prompt_image_mask = function(self.prompt_image_mask)


__all__ = ["TwigVLMCache"]
