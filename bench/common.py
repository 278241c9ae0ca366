"""What every benchmark records about the machine, and the fp32 matmul peak its utilisation figures divide by.

The scripts run as `python bench/NAME.py`, so this folder is on sys.path and `from common import ...` works."""
from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version
from pathlib import Path


def machine() -> dict:
    """CPU model, cores and versions, plus the load average: other work on the machine skews every figure."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "torch": version("torch"), "python": platform.python_version()}


def matmul_peak(threads: int, n: int = 2048, reps: int = 10) -> float:
    """Best fp32 matmul FLOP/s of `reps` timed n x n products (after two untimed ones) on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
