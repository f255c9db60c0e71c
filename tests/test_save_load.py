"""A saved TwigVLM folder loads where only transformers is installed, through the Auto classes."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from tiny_models import pixel_values, prompt_ids, tiny_twigvlm


LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    sys.modules["twigvlm"] = None  # importing our package would raise: the folder must carry everything
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    folder = sys.argv[1]
    inputs = torch.load(folder + "/probe.pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "TwigVLMConfig"
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "TwigVLMModel"
    with torch.no_grad():
        logits = model(**inputs).logits
        sequences = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "sequences": sequences}, folder + "/reloaded.pt")
    """
)


def test_round_trip_in_a_process_without_the_package(tmp_path):
    model = tiny_twigvlm()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    inputs = {"input_ids": prompt_ids(), "pixel_values": pixel_values(), "num_kept_visual_tokens": 5}
    torch.save(inputs, folder / "probe.pt")

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_twigvlm.TwigVLMConfig",
        "AutoModel": "modeling_twigvlm.TwigVLMModel",
        "AutoModelForImageTextToText": "modeling_twigvlm.TwigVLMForConditionalGeneration",
    }
    remote_code = {"modeling_twigvlm.py", "configuration_twigvlm.py", "cache_twigvlm.py", "compat_twigvlm.py"}
    assert remote_code | {"pruning_twigvlm.py", "generation_twigvlm.py"} <= {path.name for path in folder.iterdir()}
    assert (folder / "generation_config.json").is_file()

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(folder)], cwd=tmp_path, env=env, check=True, timeout=300
    )
    reloaded = torch.load(folder / "reloaded.pt")
    with torch.no_grad():
        assert torch.equal(reloaded["logits"], model(**inputs).logits)
        assert torch.equal(reloaded["sequences"], model.generate(**inputs, max_new_tokens=5, do_sample=False))
