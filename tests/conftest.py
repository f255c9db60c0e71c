"""Shared test settings."""

import torch


# The tiny models do many small matrix products; on a shared 2-core machine two threads mostly wait for each other.
torch.set_num_threads(1)
