"""Device-synchronised timing, peak memory and the device's own limits (matmul rate, memory bandwidth)."""

import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds `function` took, with the device's queue drained before and after so that kernels are counted."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def median_seconds(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    return statistics.median(timed(function, device)[0] for _ in range(repeats))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_free_heap() -> None:
    """Hand memory that the C allocator keeps after earlier runs back to the system, so the next run's peak shows."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the resident set then understates a repeated run's peak
        pass


@contextmanager
def peak_memory(device: torch.device):
    """
    Yields a dict that holds, after the block, `peak_bytes` (the highest memory in use during the block) and
    `baseline_bytes` (in use when it began): CUDA allocator statistics on a GPU, the process's resident set on a CPU
    (freed heap trimmed first and the high-water mark reset through /proc/self/clear_refs, so each block is measured
    on its own).
    """
    result: dict[str, int] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result["baseline_bytes"] = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return
    _release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")
    result["baseline_bytes"] = _status_kib("VmRSS") * 1024
    yield result
    result["peak_bytes"] = _status_kib("VmHWM") * 1024


# Matmul shapes (m, k, n) tried for the attainable rate: a CPU's rate depends much on shape (on 2 AMD EPYC cores we saw
# 90 GFLOP/s for 1024-square and 177 for 512 x 2048 x 2048), so the best of several stands for the device's limit.
MATMUL_SHAPES = {"cuda": [(8192, 8192, 8192), (4096, 8192, 8192)], "cpu": [(1024, 1024, 1024), (2048, 2048, 2048), (512, 2048, 2048), (512, 4096, 1024)]}  # fmt: skip


def measure_limits(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict[str, float]:
    """
    The device's attainable matmul rate (FLOP/s, the best of `MATMUL_SHAPES` in `dtype`) and memory bandwidth
    (bytes/s, a large copy: one read and one write per byte), measured now, under the same load as the benchmark.
    """
    on_gpu = device.type == "cuda"
    best_rate, best_shape = 0.0, None
    for m, k, n in MATMUL_SHAPES["cuda" if on_gpu else "cpu"]:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        rate = 2 * m * k * n / median_seconds(lambda: torch.mm(a, b), device, repeats)
        if rate > best_rate:
            best_rate, best_shape = rate, (m, k, n)
        del a, b
    elements = (1 << 30 if on_gpu else 1 << 28) // torch.empty((), dtype=dtype).element_size()
    source = torch.empty(elements, device=device, dtype=dtype).fill_(1)
    target = torch.empty_like(source)
    copy_seconds = median_seconds(lambda: target.copy_(source), device, repeats)
    copied_bytes = 2 * source.numel() * source.element_size()
    del source, target
    return {
        "matmul_flops_per_s": best_rate,
        "memory_bytes_per_s": copied_bytes / copy_seconds,
        "matmul_shape": best_shape,
        "copy_bytes": copied_bytes,
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict[str, object]:
    """What ran the benchmark, named as a reader needs to compare tables."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    else:
        name = f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "device": name,
        "device_type": device.type,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
