"""The model card (README.md) of a converted folder, from the template in hub_card/."""

from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import transformers
from huggingface_hub import ModelCard, ModelCardData
from packaging.requirements import Requirement
from transformers import GenerationConfig

from twigvlm import TwigVLMConfig
from twigvlm.hub_card import TEMPLATE


DISTRIBUTION = "twigvlm-hf"
TAGS = ["twigvlm", "llava", "custom_code", "token-pruning", "speculative-decoding"]


@dataclass(frozen=True)
class CardFacts:
    """What the card says about this particular conversion."""

    repo_id: str
    base_model: str
    base_description: str
    license: str
    sources: list[str]
    command: str
    dtype: str
    self_check: str
    grown_twig: bool
    image_token_added: bool


def supported_transformers() -> str:
    """The transformers range this package declares, so that the card never disagrees with pyproject.toml."""
    for requirement in map(Requirement, metadata.requires(DISTRIBUTION) or []):
        if requirement.name == "transformers":
            return ",".join(sorted(map(str, requirement.specifier), key=lambda bound: not bound.startswith(">")))
    raise RuntimeError(f"{DISTRIBUTION} declares no transformers requirement.")


def write_model_card(folder: Path, config: TwigVLMConfig, generation_config: GenerationConfig, facts: CardFacts) -> None:
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=facts.base_model,
        license=facts.license,
        tags=TAGS,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=facts.repo_id.split("/")[-1],
        **asdict(facts),
        twig_attach_layer=config.twig_attach_layer,
        num_twig_layers=config.num_twig_layers,
        final_wipe_layer=config.final_wipe_layer,
        visual_token_budget=config.visual_token_budget,
        image_token_index=config.image_token_index,
        vocab_size=config.text_config.vocab_size,
        num_assistant_tokens=generation_config.num_assistant_tokens,
        assistant_confidence_threshold=generation_config.assistant_confidence_threshold,
        transformers_range=supported_transformers(),
        transformers_version=transformers.__version__,
        converter_version=metadata.version(DISTRIBUTION),
    )
    card.save(folder / "README.md")
