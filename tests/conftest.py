"""Settings for the whole suite, made before transformers is imported."""

import os


# Everything the tests load is built or saved locally: a stray Hub request fails at once instead of waiting on the net.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
