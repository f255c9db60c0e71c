"""Loading as transformers users do: dtype, attention implementation, device_map."""

import pytest
import torch
from accelerate import infer_auto_device_map
from transformers import AutoModelForImageTextToText

from tiny_models import IMAGE_TOKEN_ID, pixel_values, prompt_ids, tiny_twigvlm
from twigvlm import output_cache


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("twigvlm")
    tiny_twigvlm().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_from_pretrained_with_dtype_and_attention(checkpoint, dtype, attn_implementation):
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, trust_remote_code=True, dtype=dtype, attn_implementation=attn_implementation
    )
    assert model.dtype == dtype and model.model.twig.lm_head.weight.dtype == dtype
    assert model.config.text_config._attn_implementation == attn_implementation
    ids = prompt_ids()
    out = model.generate(
        input_ids=ids, pixel_values=pixel_values().to(dtype), num_kept_visual_tokens=4, max_new_tokens=4,
        do_sample=False, return_dict_in_generate=True,
    )
    cache = output_cache(out)
    kept = cache.kept_prompt_positions[model.config.twig_attach_layer][0]
    assert int((ids[0, kept] == IMAGE_TOKEN_ID).sum()) == 4
    assert out.sequences.shape[1] == ids.shape[1] + 4


def test_device_map_keeps_the_twig_on_one_device():
    """accelerate's planner never splits the twig: its layers, norm and head land on one device."""
    model = tiny_twigvlm()
    assert "TwigVLMTwig" in model._no_split_modules
    sizes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    total = sum(sizes.values())
    device_map = infer_auto_device_map(
        model, max_memory={0: int(total * 0.55), 1: total}, no_split_module_classes=model._no_split_modules
    )
    twig_devices = {device for name, device in device_map.items() if name.startswith("model.twig")}
    assert len(set(device_map.values())) == 2  # the model really was split
    assert len(twig_devices) == 1
    assert "model.twig" in device_map or all(not name.startswith("model.twig.") for name in device_map)
