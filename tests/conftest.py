"""Settings for the whole suite, made before transformers is imported."""

import os

import torch


# Everything the tests load is built or saved locally: a stray Hub request fails at once instead of waiting on the net.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The tiny models do many small matrix products; on a shared 2-core machine two threads mostly wait for each other.
# Subprocesses get one thread too, so that results compared across processes are summed in the same order.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
