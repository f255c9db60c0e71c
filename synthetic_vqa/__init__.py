"""A synthetic visual-question task, a small LLaVA trained on it from scratch, its twig, and the paper's tables."""
