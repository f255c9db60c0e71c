"""The `lmms_eval.models` entry point: lmms-eval calls `manifest()` while it builds its model registry."""


def manifest():
    """Registers `--model twigvlm` as a simple model; the class is imported only when that model is asked for."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest("twigvlm", simple_class_path="twigvlm.evaluation.lmms_eval_model.TwigVLM")
