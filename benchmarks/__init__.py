"""Speed and memory benchmark of TwigVLM against transformers' LLaVA on the same weights (`twigvlm-bench`)."""
