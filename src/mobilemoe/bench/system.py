"""Machine facts a benchmark reports next to its numbers: CPU, threads, DRAM bandwidth, peak RSS."""

from __future__ import annotations

import platform
import resource
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))]
    except OSError:
        pass
    return []


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's address space.

    VmHWM from /proc, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec, so a
    benchmark worker would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dram_read_bandwidth_gbs(working_set_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth with torch's threads: best of ``repeats`` full sums over a buffer far above L3."""
    buf = torch.ones(working_set_bytes // 4, dtype=torch.float32)
    buf.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    del buf
    return working_set_bytes / best / 1e9


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
