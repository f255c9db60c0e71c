"""Shared test settings."""

import os

import torch


# The tiny models do many small matrix products; on a shared 2-core machine two threads mostly wait for each other.
# Subprocesses get one thread too, so that results compared across processes are summed in the same order.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
