"""Device profiles: YAML data files (``mobilemoe/scaling/profiles/*.yaml`` and any --profiles-dir) and a roofline speed model.

A profile file::

    name: galaxy-s25
    description: Samsung Galaxy S25 (Snapdragon 8 Elite), 8-core CPU, INT4 weights
    memory_gb: 12                 # device RAM in GiB (for "leave N GB for everything else")
    memory_bandwidth_gbs: 85.3    # DRAM peak, GB/s (1e9 bytes/s)
    bandwidth_efficiency: 0.6     # achievable share of the peak for streaming weights
    compute_gflops: {bf16: 600, int8: 1800}   # peak, GFLOP/s per dtype
    compute_efficiency: 0.5       # achievable share of the peak
    decode_dtype: int8            # which compute_gflops entry decode uses
    prefill_dtype: int8           # ... and prefill
    storage_bandwidth_gbs: 4.0    # sequential read, GB/s (cold load of the weights)
    source: where the numbers come from

Roofline: a phase takes ``max(bytes / (bandwidth * eff), flops / (compute * eff))``.
Decode reads the INT4 weights a token touches (:func:`accounting.decode_weight_bytes_per_token`)
plus the KV cache; a prefill of P tokens touches (nearly) every expert, so it reads all INT4 weights
once and does :func:`accounting.prefill_flops`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobilemoe.errors import MobileMoEError
from mobilemoe.utils import read_yaml

PROFILE_ENV = "MOBILEMOE_PROFILES"
BUILTIN_PROFILES = Path(__file__).resolve().parent / "profiles"  # shipped with the package


class ProfileError(MobileMoEError, ValueError):
    """A device profile is missing or malformed (the message names the file and field)."""


@dataclass
class DeviceProfile:
    name: str
    memory_bandwidth_gbs: float
    compute_gflops: dict[str, float]
    decode_dtype: str
    prefill_dtype: str
    storage_bandwidth_gbs: float
    description: str = ""
    memory_gb: float | None = None
    bandwidth_efficiency: float = 1.0
    compute_efficiency: float = 1.0
    source: str = ""
    path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- roofline
    @property
    def bandwidth(self) -> float:
        return self.memory_bandwidth_gbs * 1e9 * self.bandwidth_efficiency

    def compute(self, dtype: str) -> float:
        return self.compute_gflops[dtype] * 1e9 * self.compute_efficiency

    def decode_seconds(self, bytes_per_token: float, flops_per_token: float) -> tuple[float, str]:
        t_mem = bytes_per_token / self.bandwidth
        t_cmp = flops_per_token / self.compute(self.decode_dtype)
        return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")

    def prefill_seconds(self, weight_bytes: float, flops: float) -> tuple[float, str]:
        t_mem = weight_bytes / self.bandwidth
        t_cmp = flops / self.compute(self.prefill_dtype)
        return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")

    def load_seconds(self, weight_bytes: float) -> float:
        return weight_bytes / (self.storage_bandwidth_gbs * 1e9)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("extra",)}


_REQUIRED = ("name", "memory_bandwidth_gbs", "compute_gflops", "decode_dtype", "prefill_dtype",
             "storage_bandwidth_gbs")
_OPTIONAL = ("description", "memory_gb", "bandwidth_efficiency", "compute_efficiency", "source")


def _positive(data: dict, name: str, where: str, allow_none: bool = False) -> float | None:
    v = data.get(name)
    if v is None and allow_none:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ProfileError(f"{where}: field '{name}': expected a positive number, got {data.get(name)!r}")
    return float(v)


def profile_from_dict(data: Any, where: str = "profile") -> DeviceProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a YAML mapping at the top level, got {type(data).__name__}")
    for name in _REQUIRED:
        if name not in data:
            raise ProfileError(f"{where}: field '{name}': missing (required: {', '.join(_REQUIRED)})")
    unknown = [k for k in data if k not in _REQUIRED + _OPTIONAL]
    if unknown:
        raise ProfileError(f"{where}: field '{unknown[0]}': unknown (known fields: "
                           f"{', '.join(_REQUIRED + _OPTIONAL)})")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise ProfileError(f"{where}: field 'name': expected a non-empty string, got {name!r}")
    comp = data["compute_gflops"]
    if not isinstance(comp, dict) or not comp:
        raise ProfileError(f"{where}: field 'compute_gflops': expected a mapping dtype -> GFLOP/s, got {comp!r}")
    compute: dict[str, float] = {}
    for k in comp:
        try:
            compute[str(k)] = float(_positive(comp, k, where))  # type: ignore[arg-type]
        except ProfileError:
            raise ProfileError(f"{where}: field 'compute_gflops.{k}': expected a positive number, "
                               f"got {comp[k]!r}") from None
    for key in ("decode_dtype", "prefill_dtype"):
        if data[key] not in compute:
            raise ProfileError(f"{where}: field '{key}': expected one of the compute_gflops dtypes "
                               f"{sorted(compute)}, got {data[key]!r}")
    effs = {}
    for key in ("bandwidth_efficiency", "compute_efficiency"):
        if key in data:
            v = _positive(data, key, where)
            if v > 1:
                raise ProfileError(f"{where}: field '{key}': expected a fraction in (0, 1], got {v}")
            effs[key] = v
    return DeviceProfile(
        name=name.strip(), memory_bandwidth_gbs=_positive(data, "memory_bandwidth_gbs", where),
        compute_gflops=compute, decode_dtype=data["decode_dtype"], prefill_dtype=data["prefill_dtype"],
        storage_bandwidth_gbs=_positive(data, "storage_bandwidth_gbs", where),
        description=str(data.get("description", "")),
        memory_gb=_positive(data, "memory_gb", where, allow_none=True),
        source=str(data.get("source", "")), path=where, **effs)


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    path = Path(path)
    data = read_yaml(path, ProfileError, "profile")
    return profile_from_dict(data, str(path))


def profile_dirs(extra: str | os.PathLike | list | None = None) -> list[Path]:
    """Search order: ``extra`` (``--profiles-dir``), ``$MOBILEMOE_PROFILES`` (os.pathsep-separated),
    then the built-in ``mobilemoe/scaling/profiles/``."""
    dirs: list[Path] = []
    if extra:
        dirs += [Path(p) for p in (extra if isinstance(extra, (list, tuple)) else [extra])]
    env = os.environ.get(PROFILE_ENV)
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(BUILTIN_PROFILES)
    return dirs


def list_profiles(extra: str | os.PathLike | list | None = None) -> dict[str, DeviceProfile]:
    """Every profile found (earlier directories win on a name clash). A malformed file is an error."""
    found: dict[str, DeviceProfile] = {}
    for d in profile_dirs(extra):
        if not d.is_dir():
            if extra and d in [Path(p) for p in (extra if isinstance(extra, (list, tuple)) else [extra])]:
                raise ProfileError(f"{d}: no such profiles directory")
            continue
        for f in sorted(list(d.glob("*.yaml")) + list(d.glob("*.yml"))):
            prof = load_profile(f)
            found.setdefault(prof.name, prof)
    return found


def get_profile(name: str, extra: str | os.PathLike | list | None = None) -> DeviceProfile:
    """A profile by name, or by path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_profile(p)
    profiles = list_profiles(extra)
    if name not in profiles:
        raise ProfileError(f"unknown device {name!r}; known: {', '.join(sorted(profiles)) or '(none)'} "
                           f"(searched {', '.join(str(d) for d in profile_dirs(extra))})")
    return profiles[name]
