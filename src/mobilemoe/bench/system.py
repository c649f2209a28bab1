"""Machine facts a benchmark reports next to its numbers: CPU, threads, DRAM bandwidth, peak RSS."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import torch


# x86 flags that decide which INT4 kernel variant can run (and what a faster build could use).
X86_FEATURE_PREFIXES = ("avx", "amx", "fma", "f16c", "bmi2", "sse4_2")


def _cpuinfo_fields(*keys: str) -> dict[str, str]:
    """First value of each wanted ``key : value`` line of /proc/cpuinfo (Linux, Android)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def sysctl(name: str, names: bool = False) -> str | None:
    """``sysctl -n NAME`` (macOS, BSD); ``names``: ``sysctl NAME`` lines ``key: value`` of a subtree.
    None where there is no such key or no sysctl."""
    exe = shutil.which("sysctl") or ("/usr/sbin/sysctl" if os.path.exists("/usr/sbin/sysctl") else None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, name] if names else [exe, "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cpu_model() -> str:
    """x86 ``model name``; ARM Linux ``Hardware``/``CPU part`` (no model name there); macOS brand string."""
    fields = _cpuinfo_fields("model name", "Hardware", "CPU implementer", "CPU part")
    if "model name" in fields:
        return fields["model name"]
    if "Hardware" in fields:
        return fields["Hardware"]
    if "CPU part" in fields:
        return f"ARM implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    if sys.platform == "darwin":
        brand = sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))]
    except OSError:
        pass
    return []


def cpu_features() -> list[str]:
    """The CPU's SIMD features as the OS names them, sorted.

    x86: the /proc/cpuinfo flags that matter to the kernels (avx2, avx512*, amx*, fma, ...); aarch64
    Linux/Android: the whole ``Features`` line (asimd, asimddp = dotprod, i8mm, sve, bf16, ...); macOS:
    the ``hw.optional.arm.FEAT_*`` sysctls that are 1 (FEAT_DotProd, FEAT_I8MM, ...).
    """
    fields = _cpuinfo_fields("flags", "Features")
    if "flags" in fields:
        return sorted(f for f in fields["flags"].split() if f.startswith(X86_FEATURE_PREFIXES))
    if "Features" in fields:
        return sorted(fields["Features"].split())
    if sys.platform == "darwin":
        listing = sysctl("hw.optional.arm", names=True) or ""
        feats = []
        for line in listing.splitlines():
            key, _, value = line.partition(":")
            if value.strip() == "1":
                feats.append(key.strip().removeprefix("hw.optional.arm."))
        return sorted(feats)
    return []


def memory_bytes() -> dict[str, int | None]:
    """Total and available RAM: /proc/meminfo on Linux/Android, sysctl hw.memsize on macOS."""
    info: dict[str, int | None] = {"total": None, "available": None}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info["total" if key == "MemTotal" else "available"] = int(value.split()[0]) * 1024
    except OSError:
        size = sysctl("hw.memsize")
        info["total"] = int(size) if size and size.isdigit() else None
    return info


def os_info() -> dict:
    """OS, architecture, and whether this is Termux on Android (detected from its environment)."""
    termux = "TERMUX_VERSION" in os.environ or "com.termux" in os.environ.get("PREFIX", "")
    android = termux or "ANDROID_ROOT" in os.environ or os.path.exists("/system/build.prop")
    info = {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "android": android, "termux": termux, "name": None, "device_model": None}
    if sys.platform == "darwin":
        info["name"] = f"macOS {platform.mac_ver()[0]}"
        info["device_model"] = sysctl("hw.model")
    elif android:
        info["name"] = "Android " + (_getprop("ro.build.version.release") or "?")
        info["device_model"] = _getprop("ro.product.model")
    else:
        info["name"] = _os_release_name()
    return info


def _getprop(key: str) -> str | None:
    if shutil.which("getprop") is None:
        return None
    try:
        out = subprocess.run(["getprop", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _os_release_name() -> str | None:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


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
