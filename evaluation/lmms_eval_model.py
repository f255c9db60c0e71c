"""
TwigVLM as an lmms-eval model: `lmms-eval --model twigvlm --model_args pretrained=PATH_OR_REPO,...`.

lmms-eval finds it through the `lmms_eval.models` entry point of this package (see `plugin.py`); nothing in lmms-eval
changes. It is a "simple" model (the kind lmms-eval's own `llava` is): tasks hand it their prompt text and images, so
the paper's benchmarks run with LLaVA-1.5's prompts, and multiple-choice tasks can score by log-likelihood.
"""

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from twigvlm import output_cache

from .loading import load_twigvlm
from .prompting import chat_inputs, chat_prompt, encode
from .statistics import pruning_record, speculation_record


@dataclass
class TwigVLMTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus what pruning and drafting did; all of it lands in the logged samples."""

    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.extra}


class TwigVLM(lmms):
    """
    Model arguments (`--model_args k=v,...`):
        pretrained: a TwigVLM checkpoint folder or Hub repo.
        token_reduction: "twig" (TTP, the default of TwigVLM checkpoints), "none", or another registered strategy.
        visual_token_budget: R̄, the paper's average visual tokens per layer (64 / 128 / 192).
        num_kept_visual_tokens: R, set directly instead of R̄.
        speculative: true / false for self-speculative decoding; unset follows the checkpoint's generation config.
            Drafting serves one sequence at a time, so it needs batch_size=1; unset with a larger batch decodes
            without it.
        dtype: auto, float16, bfloat16 or float32. device, device_map, attn_implementation, revision as in transformers.
            The model runs with this package's classes (see `load_twigvlm`), not the checkpoint's copy of the code.
        max_new_tokens: the answer length when a task does not set one.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        token_reduction: str | None = None,
        visual_token_budget: float | None = None,
        num_kept_visual_tokens: int | None = None,
        speculative: bool | None = None,
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 1024,
    ) -> None:
        super().__init__()
        if str(batch_size) == "auto" or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive number (no automatic batch size).")
        self.batch_size_per_gpu = int(batch_size)
        if speculative and self.batch_size_per_gpu > 1:
            raise ValueError(
                f"speculative=true drafts one sequence at a time and cannot serve batch_size={batch_size}; "
                "use batch_size=1, or speculative=false for larger batches."
            )

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # data parallel: `accelerate launch -m lmms_eval ...`
            self._device = torch.device(f"cuda:{self.accelerator.local_process_index}")
            self._rank = self.accelerator.local_process_index
            self._world_size = self.accelerator.num_processes
            device_map = str(self._device)
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor = load_twigvlm(pretrained, dtype, self._device, device_map, attn_implementation, revision)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"

        self.generation_options = {
            key: value
            for key, value in dict(
                token_reduction=token_reduction,
                visual_token_budget=visual_token_budget,
                num_kept_visual_tokens=num_kept_visual_tokens,
            ).items()
            if value is not None
        }
        checkpoint_drafts = self.model.generation_config.assistant_early_exit is not None
        self.speculative = bool(checkpoint_drafts if speculative is None else speculative)
        if self.speculative and self.batch_size_per_gpu > 1:
            logger.info("batch_size > 1: decoding without self-speculative decoding, which serves one sequence at a time.")
            self.speculative = False
        self.max_new_tokens = max_new_tokens

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _images(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        visuals = [visual for visual in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if visual is not None]
        if any(not isinstance(visual, Image.Image) for visual in visuals):
            raise ValueError(f"TwigVLM (LLaVA-1.5) answers about images; task {task!r} gave {type(visuals[0]).__name__}.")
        return visuals

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy or sampled answers cut at the task's stop strings, with pruning and drafting figures per sample."""
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="TwigVLM answering")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            images = [self._images(*args) for args in zip(doc_to_visuals, tasks, splits, doc_ids)]
            # Pruning keeps R per row, so a batch needs the same number of images in every row.
            chunk_results = [None] * len(chunk)
            for group in _groups_by(images):
                answers = self._generate([contexts[i] for i in group], [images[i] for i in group], dict(all_gen_kwargs[0]))
                for i, answer in zip(group, answers):
                    chunk_results[i] = answer
            results += chunk_results
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def _generate(
        self, contexts: list[str], images: list[list[Image.Image]], gen_kwargs: dict[str, Any]
    ) -> list[GenerationResult]:
        until = gen_kwargs.pop("until", None) or [self.tokenizer.eos_token]
        until = [until] if isinstance(until, str) else list(until)
        temperature = gen_kwargs.pop("temperature", 0) or 0
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        options = dict(
            max_new_tokens=gen_kwargs.pop("max_new_tokens", self.max_new_tokens),
            num_beams=gen_kwargs.pop("num_beams", 1),
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=gen_kwargs.pop("top_p", None) if do_sample else None,
        )
        inputs = chat_inputs(self.processor, list(contexts), images, self.device, self.model.dtype)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                **options,
                **self.generation_options,
                speculative_decoding=self.speculative,
                stop_strings=until,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                return_dict_in_generate=True,
            )
        seconds = time.perf_counter() - started
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        shared = {
            **pruning_record(output_cache(output), self.model.config.text_config.num_hidden_layers),
            **speculation_record(output_cache(output)),
            "token_reduction": self.generation_options.get("token_reduction", self.model.config.token_reduction),
            "speculative": self.speculative,
            "batch_seconds": seconds,
            "batch_size": len(contexts),
        }
        results = []
        for row, attention in zip(new_tokens, inputs["attention_mask"]):
            num_output = _answer_length(row, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
            text = _cut_at_stop_strings(self.tokenizer.decode(row[:num_output], skip_special_tokens=True), until)
            counts = TwigVLMTokenCounts(input_tokens=int(attention.sum()), output_tokens=num_output, extra=shared)
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """
        Log-probability of each continuation and whether greedy decoding would produce it.

        The context is prefilled alone, so pruning chooses its visual tokens from the question exactly as when
        generating, then the continuation runs on that pruned cache; scoring context and continuation in one pass
        would let the answer choose the visual tokens. Each `(log_prob, is_greedy)` pair travels as the `text` of a
        `GenerationResult`: lmms-eval 0.7.3 turns a bare pair into its string (`unwrap_generation_output`), which its
        multiple-choice scoring cannot read, and the wrapper also carries the pruning figures to the logged samples.
        """
        results = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc="TwigVLM scoring"
        ):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = [self._images(doc_to_visual, task, split, doc_id)]
            prompt_text = chat_prompt(self.processor, context, len(images[0]))
            num_context = encode(self.processor, [prompt_text], images, self.device, self.model.dtype)["input_ids"].shape[1]
            # Tokenized together, as the model reads them; the context's tokens are the first `num_context`.
            whole = encode(self.processor, [prompt_text + continuation], images, self.device, self.model.dtype)
            prompt = {key: value[:, :num_context] if key != "pixel_values" else value for key, value in whole.items()}
            continuation_ids = whole["input_ids"][:, num_context:]
            (log_prob, is_greedy), cache = self._score(prompt, continuation_ids)
            record = {
                **pruning_record(cache, self.model.config.text_config.num_hidden_layers),
                "token_reduction": self.generation_options.get("token_reduction", self.model.config.token_reduction),
            }
            counts = TwigVLMTokenCounts(input_tokens=num_context, output_tokens=continuation_ids.shape[1], extra=record)
            results.append(GenerationResult(text=(log_prob, is_greedy), token_counts=counts))
        return results

    def _score(self, prompt, continuation_ids: torch.Tensor) -> tuple[tuple[float, bool], Any]:
        """The continuation's log-probability and greediness, and the cache its prefill pruned."""
        if continuation_ids.shape[1] == 0:
            raise ValueError("The continuation to score is empty after tokenization.")
        with torch.inference_mode():
            prefill = self.model(**prompt, **self.generation_options, use_cache=True, logits_to_keep=1)
            logits = [prefill.logits[:, -1:]]
            if continuation_ids.shape[1] > 1:
                rest = self.model(input_ids=continuation_ids[:, :-1], cache=output_cache(prefill))
                logits.append(rest.logits)
        log_probs = torch.cat(logits, dim=1).float().log_softmax(dim=-1)
        total = log_probs.gather(-1, continuation_ids[..., None]).sum()
        is_greedy = bool((log_probs.argmax(dim=-1) == continuation_ids).all())
        return (float(total), is_greedy), output_cache(prefill)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "TwigVLM's lmms-eval model answers single-round tasks (generate_until) and scores choices "
            "(loglikelihood); multi-round tasks are not supported."
        )


def _groups_by(images: list[list[Image.Image]]) -> list[list[int]]:
    """Indices of the rows, grouped by how many images each row has, in their first-seen order."""
    groups: dict[int, list[int]] = {}
    for index, row in enumerate(images):
        groups.setdefault(len(row), []).append(index)
    return list(groups.values())


def _answer_length(row: torch.Tensor, eos_token_id: int, pad_token_id: int | None) -> int:
    """Generated tokens up to and including the first EOS; what follows is padding of a finished row."""
    tokens = row.tolist()
    if eos_token_id in tokens:
        return tokens.index(eos_token_id) + 1
    while tokens and tokens[-1] == pad_token_id:
        tokens.pop()
    return len(tokens)


def _cut_at_stop_strings(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
