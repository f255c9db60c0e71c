"""
Tiny checkpoints in every layout the converter reads, written by the tests (no download), and the reference models
built directly from the same tensors with the tests' own name mapping.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from twigvlm import TwigVLMConfig, TwigVLMForConditionalGeneration
from twigvlm.conversion.processing import build_llava15_processor


IMAGE_SIZE, PATCH_SIZE = 56, 14
NUM_LAYERS, K, T, F = 6, 2, 2, 5
ORIGINAL_VOCAB = 100  # V0: the original vocabulary; <image> becomes token 100
VOCAB = 128  # padded to a multiple of 64, as the converter does by default
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    projection_dim=16,
)
TWIG_OPTIONS = ["--twig-attach-layer", str(K), "--final-wipe-layer", str(F), "--visual-token-budget", "8"]


def random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights larger than the default init, so attention and logits are peaked and nothing ties."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.08 if parameter.ndim > 1 else 1))
    return module.eval()


@dataclass
class RawTensors:
    """The released tensors under their release names: LLaVA-1.5 (Vicuna + projector), CLIP, the authors' twig."""

    llava: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    twig: dict[str, torch.Tensor]
    clip_config: CLIPConfig


def raw_tensors(seed: int = 0, hidden_size: int = 64) -> RawTensors:
    text = {**TEXT, "hidden_size": hidden_size}
    llama = random_(LlamaForCausalLM(LlamaConfig(**text, vocab_size=ORIGINAL_VOCAB)), seed)
    clip_config = CLIPConfig(
        vision_config=VISION,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
                         bos_token_id=0, eos_token_id=1),
        projection_dim=16,
    )
    clip = random_(CLIPModel(clip_config), seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    llava = dict(llama.state_dict())
    llava["model.mm_projector.0.weight"] = torch.randn(hidden_size, VISION["hidden_size"], generator=generator) * 0.1
    llava["model.mm_projector.0.bias"] = torch.randn(hidden_size, generator=generator) * 0.1
    llava["model.mm_projector.2.weight"] = torch.randn(hidden_size, hidden_size, generator=generator) * 0.1
    llava["model.mm_projector.2.bias"] = torch.randn(hidden_size, generator=generator) * 0.1
    twig_config = LlamaConfig(**text, vocab_size=ORIGINAL_VOCAB)
    twig = {}
    for i in range(T):
        layer = random_(LlamaDecoderLayer(twig_config, layer_idx=i), seed + 10 + i)
        twig.update({f"model.layers.{i}.{name}": tensor for name, tensor in layer.state_dict().items()})
    twig["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden_size, generator=generator)
    twig["lm_head.weight"] = torch.randn(ORIGINAL_VOCAB, hidden_size, generator=generator) * 0.08
    # The authors' release is bfloat16; keep the values exactly representable in every dtype the tests use.
    twig = {name: tensor.to(torch.bfloat16) for name, tensor in twig.items()}
    return RawTensors({n: t.contiguous() for n, t in llava.items()}, clip.state_dict(), twig, clip_config)


def word_tokenizer(num_tokens: int = ORIGINAL_VOCAB) -> PreTrainedTokenizerFast:
    """The original vocabulary: specials and filler words, exactly `num_tokens` of them, no <image>."""
    words = ["<unk>", "<s>", "</s>", "what", "is", "shown", "in", "this", "image", "?", "describe", "the", "colours",
             "and", "shapes", ".", "a", "chat", "user", "assistant", ":"]
    words += [f"w{i}" for i in range(num_tokens - len(words))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def original_config() -> dict:
    """config.json as the LLaVA-1.5 release writes it (`LlavaLlamaForCausalLM`, model_type "llava", mm_* fields)."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **TEXT,
        "hidden_act": "silu",
        "vocab_size": ORIGINAL_VOCAB,
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "torch_dtype": "float16",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def write_original(raw: RawTensors, root: Path) -> tuple[Path, Path, Path]:
    """The three released folders: LLaVA-1.5 (two `.bin` shards with an index), CLIP, the authors' twig."""
    llava, clip, twig = root / "llava-v1.5", root / "clip", root / "twig"
    for folder in (llava, clip, twig):
        folder.mkdir(parents=True)
    (llava / "config.json").write_text(json.dumps(original_config()))
    (llava / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    tensors = dict(raw.llava)
    for i in range(NUM_LAYERS):  # what transformers < 4.32 saved with Vicuna
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file_name, shard_names in shards.items():
        torch.save({name: tensors[name] for name in shard_names}, llava / file_name)
    weight_map = {name: file_name for file_name, shard_names in shards.items() for name in shard_names}
    (llava / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    word_tokenizer().save_pretrained(llava)

    save_file(raw.clip, clip / "model.safetensors", metadata={"format": "pt"})
    raw.clip_config.save_pretrained(clip)
    clip_image_processor().save_pretrained(clip)
    save_file(raw.twig, twig / "model.safetensors", metadata={"format": "pt"})
    return llava, clip, twig


def clip_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )


def pad_rows(tensor: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """Rows for the added tokens, deliberately unlike the converter's: they must not matter."""
    extra = torch.randn(rows - tensor.shape[0], tensor.shape[1], generator=torch.Generator().manual_seed(seed))
    return torch.cat([tensor, extra.to(tensor.dtype)])


def llava_hf_state(raw: RawTensors) -> dict[str, torch.Tensor]:
    """The tests' own mapping of the released tensors to transformers-5 LLaVA names, vocabulary padded to VOCAB."""
    state = {}
    for name, tensor in raw.llava.items():
        if name.startswith("model.mm_projector."):
            index = name.split(".")[2]
            state[f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{name.split('.')[-1]}"] = tensor
        elif name.startswith("model."):
            state["model.language_model." + name[len("model."):]] = tensor
        else:
            state[name] = tensor
    for name, tensor in raw.clip.items():
        if name.startswith("vision_model."):
            state["model.vision_tower." + name[len("vision_model."):]] = tensor
    state["model.language_model.embed_tokens.weight"] = pad_rows(state["model.language_model.embed_tokens.weight"], VOCAB, 7)
    state["lm_head.weight"] = pad_rows(state["lm_head.weight"], VOCAB, 8)
    return state


def llava_config(raw: RawTensors) -> LlavaConfig:
    return LlavaConfig(
        vision_config=raw.clip_config.vision_config.to_dict(),
        text_config={"model_type": "llama", **TEXT, "vocab_size": VOCAB},
        image_token_index=ORIGINAL_VOCAB,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )


def reference_llava(raw: RawTensors) -> LlavaForConditionalGeneration:
    """transformers' LLaVA holding the released base tensors (strict load: every name and shape is LLaVA's)."""
    model = LlavaForConditionalGeneration(llava_config(raw)).eval()
    model.load_state_dict(llava_hf_state(raw), strict=True)
    return model


def reference_twigvlm(raw: RawTensors, base_state: dict[str, torch.Tensor] | None = None):
    """Our model built directly from the released tensors, with the tests' own mapping (no converter code)."""
    config = TwigVLMConfig(
        vision_config=raw.clip_config.vision_config.to_dict(),
        text_config={"model_type": "llama", **TEXT, "vocab_size": VOCAB},
        image_token_index=ORIGINAL_VOCAB,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        twig_attach_layer=K,
        num_twig_layers=T,
        final_wipe_layer=F,
        visual_token_budget=8,
    )
    model = TwigVLMForConditionalGeneration(config).eval()
    state = dict(base_state if base_state is not None else llava_hf_state(raw))
    for name, tensor in raw.twig.items():
        if name.startswith("model.layers."):
            state["model.twig.layers." + name[len("model.layers."):]] = tensor.float()
    state["model.twig.norm.weight"] = raw.twig["model.norm.weight"].float()
    state["model.twig.lm_head.weight"] = pad_rows(raw.twig["lm_head.weight"].float(), VOCAB, 9)
    model.load_state_dict(state, strict=True)
    return model


# transformers-5 LLaVA name prefixes and what transformers 4 called them.
V4_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}


def v4_name(name: str) -> str:
    prefix = next(prefix for prefix in V4_PREFIXES if name.startswith(prefix))
    return V4_PREFIXES[prefix] + name[len(prefix):]


LLAVA_HF_NAMES = ("transformers-4 save", "transformers-5 save", "module names")


def write_llava_hf(raw: RawTensors, folder: Path, names: str) -> Path:
    """
    A llava-hf checkpoint (`<image>`, then `<pad>` in its tokenizer) as transformers 4 saved it (with its
    preprocessor_config.json), as transformers 5 saves it, or as a state dict under the module names.
    """
    model = reference_llava(raw)
    processor = build_llava15_processor(word_tokenizer(), IMAGE_SIZE, PATCH_SIZE, CLIP_MEAN, CLIP_STD)
    processor.tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if names == "transformers-5 save":
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder
    folder.mkdir(parents=True)
    state = model.state_dict()
    if names == "transformers-4 save":
        state = {v4_name(name): tensor for name, tensor in state.items()}
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, folder / "model.safetensors")
    model.config.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    clip_image_processor().save_pretrained(folder)
    return folder
