"""TwigVLM: LLaVA with a twig grown on layer K of its language model, which ranks the visual tokens to prune."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.utils import logging
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from .cache_twigvlm import TwigVLMCache
from .compat_twigvlm import CACHE_NAME, IMAGE_OUTPUTS_FIELD, image_output_fields, output_cache
from .configuration_twigvlm import TwigVLMConfig
from .generation_twigvlm import TwigDraftCandidateGenerator, speculative_generation_defaults
from .pruning_twigvlm import (
    keep_top_visual_tokens,
    last_token_attention,
    resolve_num_kept_visual_tokens,
    resolve_token_reduction,
)
from .token_reduction_twigvlm import TOKEN_REDUCTION_STRATEGIES, PrefillRun, build_token_reduction


logger = logging.get_logger(__name__)


@dataclass
class TwigModelOutput(ModelOutput):
    """
    last_hidden_state: the twig's output after its norm. attach_layer_hidden_states: the hidden states entering base
    layer K, which the twig read.
    """

    last_hidden_state: torch.Tensor | None = None
    attach_layer_hidden_states: torch.Tensor | None = None
    cache: Cache | None = None


@dataclass
class TwigCausalLMOutput(ModelOutput):
    """The twig's logits (its own LM head) and, given labels, their next-token loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None


class TwigVLMTwig(nn.Module):
    """
    The twig: T decoder layers of the base's own class that read the hidden states entering base layer K, with their
    own final norm and LM head. Its layers use cache slots L..L+T-1, after the base layers.
    """

    def __init__(self, config: TwigVLMConfig, decoder_layer_class: type[nn.Module], norm_class: type[nn.Module]):
        super().__init__()
        text_config = config.text_config
        num_base_layers = text_config.num_hidden_layers
        self.layers = nn.ModuleList(
            decoder_layer_class(text_config, layer_idx=num_base_layers + i) for i in range(config.num_twig_layers)
        )
        self.norm = norm_class(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the hidden states entering the last twig layer (token pruning scores them) and leaving the twig."""
        for layer in self.layers:
            last_layer_input = hidden_states
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                **{CACHE_NAME: cache},
                use_cache=True,
                **kwargs,
            )
        return last_layer_input, hidden_states


class TwigVLMPreTrainedModel(LlavaPreTrainedModel):
    config_class = TwigVLMConfig
    _no_split_modules = ["TwigVLMTwig"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # Token pruning chooses data-dependent shapes and keeps different lengths per layer group: no fullgraph compile,
    # no flex-attention masks, and no serving backend that would run the language model without it.
    _can_compile_fullgraph = False
    _supports_flex_attn = False
    _supports_attention_backend = False


class TwigVLMModel(TwigVLMPreTrainedModel, LlavaModel):
    """LLaVA's vision tower, projector and language model, plus the twig; the forward prunes visual tokens (TTP)."""

    def __init__(self, config: TwigVLMConfig):
        TwigVLMPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.twig = TwigVLMTwig(config, type(self.language_model.layers[0]), type(self.language_model.norm))
        self.post_init()

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None,
        **image_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, BaseModelOutputWithPooling | None, torch.Tensor | None]:
        """
        Token embeddings with the projected image features in place; also the image-token mask, the images' outputs
        and their features concatenated.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
        if image_outputs is None:
            return inputs_embeds, None, None, None

        image_features = torch.cat(list(image_outputs.pooler_output), dim=0)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        special_image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features=image_features)
        inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, image_features)
        return inputs_embeds, special_image_mask[..., 0], image_outputs, image_features

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        token_reduction: str | None = None,
        token_reduction_options: dict | None = None,
        visual_token_budget: float | None = None,
        num_kept_visual_tokens: int | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaModelOutputWithPast:
        r"""
        cache (`TwigVLMCache`, *optional*):
            The KV cache; `past_key_values` is its name before transformers 5.24 and is accepted as well.
        token_reduction (`str`, *optional*):
            `"twig"` (twig-guided token pruning), `"none"`, or a method TwigVLM is compared against (`"fastv"`,
            `"sparsevlm"`, `"visionzip"`, `"fastervlm"`, `"illava"`, `"mustdrop"`, `"random"`, `"pooling"`; see
            `token_reduction_twigvlm.py`); defaults to `config.token_reduction`.
        token_reduction_options (`dict`, *optional*):
            The method's own options (e.g. `{"layer": 3}` for FastV); an unknown one is an error listing the valid ones.
        visual_token_budget (`float`, *optional*):
            The budget as the method's paper counts it: R̄, the average number of visual tokens per base layer, for the
            twig, FastV, SparseVLM, iLLaVA and MustDrop; the tokens entering the language model for VisionZip,
            FasterVLM, random pruning and pooling. Overrides the config for this call.
        num_kept_visual_tokens (`int`, *optional*):
            R, the visual tokens kept at the pruning layer (K..F-1 for the twig); overrides the config for this call.

        Token reduction happens in the prefill (an empty cache) of a prompt with image tokens. With it, the hidden
        states of the last layers cover only the tokens that reached them, so `last_hidden_state` is shorter than the
        input; its last rows are still the last prompt tokens. The cache records what each layer group kept
        (`visual_token_counts`) and, per sample, the tokens entering the language model and the layer average R̄
        (`token_reduction_report`).
        """
        strategy = build_token_reduction(
            self.config,
            token_reduction,
            token_reduction_options,
            visual_token_budget,
            num_kept_visual_tokens,
            vision_feature_layer,
            vision_feature_select_strategy,
        )
        cache = cache if cache is not None else past_key_values
        if cache is None:
            cache = TwigVLMCache(self.config)
        elif not hasattr(cache, "layer_groups"):
            raise TypeError(
                f"TwigVLM needs its own TwigVLMCache (layers of different lengths plus the twig's), got "
                f"{type(cache).__name__}; pass {CACHE_NAME}=None to let the model create it."
            )
        if output_hidden_states:
            raise ValueError(
                "output_hidden_states is not supported: after token pruning the layers hold different tokens."
            )
        # Tokens the draft already ran through layers 0..K-1 (self-speculative decoding): only the rest run them now.
        drafted = cache.pop_draft_attach_hidden_states()
        num_drafted = 0 if drafted is None else drafted.shape[1]
        batch_size, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past_length = cache.get_logical_length() - num_drafted
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=device)
        position_ids = position_ids.expand(batch_size, -1)

        # The prefill (an empty cache) is where token reduction acts: `PrefillRun` drives the strategy's hooks.
        run = PrefillRun(self, strategy, cache, attention_mask, position_ids, **kwargs) if past_length == 0 else None
        if run is not None:
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs = run.reduce_images(
                input_ids, inputs_embeds, pixel_values, mm_encoder_outputs
            )
        inputs_embeds, image_token_mask, image_outputs, image_features = self.embed_inputs(
            input_ids,
            inputs_embeds,
            pixel_values,
            mm_encoder_outputs,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
        )
        rotary_emb = self.language_model.rotary_emb
        if run is not None:  # it lays out the prompt and gives each group its positions
            attention_mask = run.start(inputs_embeds, image_token_mask, rotary_emb)
        else:
            if attention_mask is None and cache.has_padding_slots:
                attention_mask = torch.ones(batch_size, past_length + seq_length, dtype=torch.long, device=device)
            position_embeddings = rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        for group_start, group_end in cache.layer_groups:
            if run is not None:
                hidden_states, group_position_embeddings = run.enter_group(group_start, group_end, hidden_states)
            elif group_start in cache.position_shifts:  # a reduction renumbered this group's prompt
                group_position_ids = cache.group_position_ids(position_ids, group_start)
                group_position_embeddings = rotary_emb(hidden_states, group_position_ids)
            else:
                group_position_embeddings = position_embeddings
            if group_start > 0:
                hidden_states = self.run_layer_group(
                    group_start, group_end, hidden_states, group_position_embeddings, attention_mask, cache, **kwargs
                )
                continue
            new_position_embeddings = tuple(embedding[:, num_drafted:] for embedding in group_position_embeddings)
            new_hidden_states = self.run_layer_group(
                0, group_end, hidden_states[:, num_drafted:], new_position_embeddings, attention_mask, cache, **kwargs
            )
            twig_scored = run is not None and run.active and strategy.runs_twig
            if cache.keep_twig_cache and not twig_scored:  # keep the twig's KV in step with the base layers for drafting
                self.run_twig(new_hidden_states, new_position_embeddings, attention_mask, cache, **kwargs)
            hidden_states = new_hidden_states if drafted is None else torch.cat([drafted, new_hidden_states], dim=1)
        if run is not None:
            run.finish()

        hidden_states = self.language_model.norm(hidden_states)
        return LlavaModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache if use_cache else None},
            **image_output_fields(image_outputs, image_features),
        )

    def run_layer_group(
        self,
        group_start: int,
        group_end: int,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: TwigVLMCache,
        **kwargs,
    ) -> torch.Tensor:
        """Base layers `group_start..group_end-1`, which hold the same tokens, under one mask sized from their cache."""
        causal_mask = create_causal_mask(
            config=self.config.text_config,
            inputs_embeds=hidden_states,
            attention_mask=cache.group_attention_mask(attention_mask, group_start),
            **{CACHE_NAME: cache},
            layer_idx=group_start,
        )
        for decoder_layer in self.language_model.layers[group_start:group_end]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                **{CACHE_NAME: cache},
                use_cache=True,
                **kwargs,
            )
        return hidden_states

    def run_twig(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: TwigVLMCache | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The twig's layers on hidden states entering layer K, under a mask sized from its own cache slots."""
        twig_mask = create_causal_mask(
            config=self.config.text_config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            **{CACHE_NAME: cache},
            layer_idx=cache.twig_layer_indices[0] if cache is not None else None,
        )
        return self.twig(hidden_states, twig_mask, position_embeddings, cache, **kwargs)

    def twig_forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> TwigModelOutput:
        """
        The shallow model: base layers 0..K-1, then the twig and its norm, on every token (the twig never prunes).

        With a cache it reads and extends the KV of base layers 0..K-1 and of the twig's own layers, which is how
        self-speculative drafting shares the verifier's cache; without one it is the training forward. Base layers
        K..L-1 never run.
        """
        inputs_embeds, *_ = self.embed_inputs(
            input_ids,
            inputs_embeds,
            pixel_values,
            mm_encoder_outputs,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
        )
        batch_size, seq_length = inputs_embeds.shape[:2]
        if position_ids is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past_length, past_length + seq_length, device=inputs_embeds.device)
        position_ids = position_ids.expand(batch_size, -1)
        position_embeddings = self.language_model.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        shallow_mask = create_causal_mask(
            config=self.config.text_config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            **{CACHE_NAME: cache},
            layer_idx=0,
        )
        for decoder_layer in self.language_model.layers[: self.config.twig_attach_layer]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=shallow_mask,
                position_embeddings=position_embeddings,
                **{CACHE_NAME: cache},
                use_cache=cache is not None,
                **kwargs,
            )
        _, twig_hidden_states = self.run_twig(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return TwigModelOutput(
            last_hidden_state=self.twig.norm(twig_hidden_states),
            attach_layer_hidden_states=hidden_states,
            cache=cache,
        )

    def num_kept_visual_tokens(
        self,
        image_token_mask: torch.Tensor,
        visual_token_budget: float | None,
        num_kept_visual_tokens: int | None,
    ) -> int:
        """R for this prompt; pruning keeps the same count in every row, so every row needs the same image-token count."""
        visual_per_row = image_token_mask.sum(dim=1)
        if (visual_per_row != visual_per_row[0]).any():
            raise ValueError(
                f"Token pruning needs the same number of image tokens in every sample of a batch, got "
                f"{visual_per_row.tolist()}; give each sample one image of the same size, or pass token_reduction='none'."
            )
        return resolve_num_kept_visual_tokens(
            self.config, int(visual_per_row[0]), visual_token_budget, num_kept_visual_tokens
        )

    def twig_guided_keep(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: TwigVLMCache,
        image_token_mask: torch.Tensor,
        num_kept: int,
        **kwargs,
    ) -> torch.Tensor:
        """Run the twig on the layer-K prompt and keep the visual tokens its last layer's last query attends to most."""
        last_layer_input, _ = self.run_twig(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        scores = last_token_attention(
            self.twig.layers[-1],
            last_layer_input[:, -1:],
            cache.layers[cache.twig_layer_indices[-1]].keys,
            tuple(embedding[:, -1:] for embedding in position_embeddings),
            None if attention_mask is None else attention_mask.bool(),
        )
        if not cache.keep_twig_cache:
            cache.free_twig()
        return keep_top_visual_tokens(scores, image_token_mask, num_kept)


class TwigVLMForConditionalGeneration(TwigVLMPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin):
    """TwigVLM with LLaVA's LM head: `generate` prunes visual tokens with the twig (TTP)."""

    def __init__(self, config: TwigVLMConfig):
        TwigVLMPreTrainedModel.__init__(self, config)
        self.model = TwigVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # The paper's default is pruning plus self-speculative decoding; a checkpoint's generation_config.json wins.
        self.generation_config.update(**speculative_generation_defaults(config))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        token_reduction: str | None = None,
        token_reduction_options: dict | None = None,
        visual_token_budget: float | None = None,
        num_kept_visual_tokens: int | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast:
        r"""
        cache (`TwigVLMCache`, *optional*):
            The KV cache; `past_key_values` is its name before transformers 5.24 and is accepted as well.
        token_reduction (`str`, *optional*):
            `"twig"` (twig-guided token pruning), `"none"`, or a method TwigVLM is compared against (`"fastv"`,
            `"sparsevlm"`, `"visionzip"`, `"fastervlm"`, `"illava"`, `"mustdrop"`, `"random"`, `"pooling"`; see
            `token_reduction_twigvlm.py`); defaults to `config.token_reduction`.
        token_reduction_options (`dict`, *optional*):
            The method's own options (e.g. `{"layer": 3}` for FastV); an unknown one is an error listing the valid ones.
        visual_token_budget (`float`, *optional*):
            The budget as the method's paper counts it: R̄, the average number of visual tokens per base layer, for the
            twig, FastV, SparseVLM, iLLaVA and MustDrop; the tokens entering the language model for VisionZip,
            FasterVLM, random pruning and pooling. Overrides the config for this call.
        num_kept_visual_tokens (`int`, *optional*):
            R, the visual tokens kept at the pruning layer (K..F-1 for the twig); overrides the config for this call.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            token_reduction=token_reduction,
            token_reduction_options=token_reduction_options,
            visual_token_budget=visual_token_budget,
            num_kept_visual_tokens=num_kept_visual_tokens,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(
                    f"Token pruning left logits for {logits.shape[1]} of the {labels.shape[1]} labelled positions; "
                    "pass token_reduction='none' to compute a loss over the whole sequence."
                )
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return LlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            **{IMAGE_OUTPUTS_FIELD: getattr(outputs, IMAGE_OUTPUTS_FIELD)},
        )

    def twig_forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> TwigCausalLMOutput:
        """The shallow model's logits (base layers 0..K-1, the twig, its head) and, given labels, their loss."""
        outputs = self.model.twig_forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.model.twig.lm_head(outputs.last_hidden_state[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return TwigCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache)

    def _prepare_generation_config(self, generation_config, speculative_decoding: bool | None = None, **kwargs):
        """
        Self-speculative decoding is on when `assistant_early_exit` is set, as TwigVLM checkpoints ship it in their
        generation config. `generate(..., speculative_decoding=False)` turns it off for one call and `True` turns it
        on. It serves one sequence at a time from the KV cache: for a batch, beams, several return sequences or no
        cache it is switched off with a warning when it came from the checkpoint's defaults, and refused when asked;
        likewise with a token reduction other than `"twig"` or `"none"` (the baselines decode without drafting).
        """
        asked = speculative_decoding is True or kwargs.get("assistant_early_exit") is not None
        if generation_config is not None and generation_config.assistant_early_exit is not None:
            asked = True
        if speculative_decoding is not None:
            kwargs["assistant_early_exit"] = self.config.twig_attach_layer if speculative_decoding else None
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        if speculative_decoding is False:  # a None in kwargs does not override the checkpoint's value everywhere
            generation_config.assistant_early_exit = None
        if generation_config.assistant_early_exit is None:
            return generation_config, model_kwargs

        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        reasons = []
        if inputs is not None and inputs.shape[0] > 1:
            reasons.append(f"a batch of {inputs.shape[0]}")
        if generation_config.num_beams > 1:
            reasons.append(f"num_beams={generation_config.num_beams}")
        if generation_config.num_return_sequences > 1:
            reasons.append(f"num_return_sequences={generation_config.num_return_sequences}")
        if generation_config.use_cache is False:
            reasons.append("use_cache=False")
        token_reduction = resolve_token_reduction(self.config, kwargs.get("token_reduction"))
        # Drafting needs layers 0..K-1 and the twig's KV as TTP (or no reduction) leaves them.
        if token_reduction not in ("twig", "none"):
            reasons.append(f"token_reduction={token_reduction!r}")
        if not reasons:
            return generation_config, model_kwargs
        reason = ", ".join(reasons)
        if asked:
            raise ValueError(
                f"Self-speculative decoding serves one sequence at a time from the KV cache and cannot decode with "
                f"{reason}; pass speculative_decoding=False to decode without it."
            )
        logger.warning_once(
            f"Self-speculative decoding (on in this checkpoint's generation config) serves one sequence at a time from "
            f"the KV cache; decoding with {reason} without it. Pass speculative_decoding=False to silence this warning."
        )
        generation_config.assistant_early_exit = None
        return generation_config, model_kwargs

    def _get_candidate_generator(
        self,
        generation_config,
        input_ids: torch.LongTensor,
        inputs_tensor: torch.Tensor,
        logits_processor,
        model_kwargs: dict,
        assistant_model=None,
        target_tokenizer=None,
        assistant_tokenizer=None,
    ):
        """With `assistant_early_exit` and no separate assistant model, the twig drafts (self-speculative decoding)."""
        if generation_config.assistant_early_exit is None or assistant_model is not None:
            return super()._get_candidate_generator(
                generation_config,
                input_ids,
                inputs_tensor,
                logits_processor,
                model_kwargs,
                assistant_model=assistant_model,
                target_tokenizer=target_tokenizer,
                assistant_tokenizer=assistant_tokenizer,
            )
        return TwigDraftCandidateGenerator(self, generation_config, logits_processor, model_kwargs[CACHE_NAME])

    def _prepare_multimodal_encoder_kwargs_for_generation(self, model_kwargs: dict) -> dict:
        """A token reduction that acts in the vision tower encodes the images in the prefill, where it reduces them."""
        token_reduction = resolve_token_reduction(self.config, model_kwargs.get("token_reduction"))
        if TOKEN_REDUCTION_STRATEGIES[token_reduction].reduces_image_features:
            return model_kwargs
        return super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`generate` gets a TwigVLMCache: base layers of different lengths after pruning, plus the twig's layers."""
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} cannot hold the different lengths "
                "per layer that token pruning leaves; leave cache_implementation unset (a dynamic TwigVLMCache)."
            )
        if model_kwargs.get(CACHE_NAME) is not None:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.use_cache is False:
            if resolve_token_reduction(self.config, model_kwargs.get("token_reduction")) != "none":
                raise ValueError(
                    "Token pruning happens once, in the prefill, and needs the KV cache: with use_cache=False every "
                    "step would prune anew. Generate with use_cache=True, or pass token_reduction='none'."
                )
            return
        model_kwargs[CACHE_NAME] = TwigVLMCache(self.config)


__all__ = ["TwigVLMForConditionalGeneration", "TwigVLMModel", "TwigVLMPreTrainedModel"]
