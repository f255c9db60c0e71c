"""`python -m twigvlm.training` (also under `accelerate launch -m`): the twigvlm-train command."""

from .cli import main


main()
