"""Product decisions from numbers: size tier, on-device vs cloud features, ReMoE vs new hardware.

Three questions of the on-device brief, each answered from the same speed model:

* :func:`tier_decision` -- the most capable released tier whose resident memory (INT4 weights + KV
  cache at the context) leaves the reserve free (:func:`mobilemoe.scaling.planner.tier_fit`);
* :func:`feature_decisions` -- per product feature, on-device (predicted TTFT and full-reply time within
  its budget, context within the model's window, memory within the budget) or cloud, and why;
* :func:`remoe_vs_hardware` -- decode speed under expert offloading before ReMoE, after ReMoE, and on an
  upgraded device without it (cache simulation over a real workload's routing trace).

Speeds (:class:`SpeedModel`): the device profile's roofline (:mod:`mobilemoe.scaling.profiles`) over the
byte/FLOP counts of :mod:`mobilemoe.accounting`, or measured numbers from a benchmark JSON
(``mobilemoe bench --json``). Every number carries its source: ``measured``, ``projected`` (roofline)
or ``calibrated`` (roofline x measured/roofline of the benchmarked model on the same device).
:func:`measure_profile` measures this machine's profile with the native kernels.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mobilemoe import accounting
from mobilemoe.config import MobileMoEConfig, preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.scaling.planner import GIB, PUBLISHED_TIERS, tier_fit
from mobilemoe.scaling.profiles import DeviceProfile

TIERS = tuple(PUBLISHED_TIERS)
DEFAULT_STORAGE_LATENCY_US = 100.0  # per batched random read; profiles carry no latency field


class DecideError(MobileMoEError, ValueError):
    """Bad input to a decision (the message names the file/field/option)."""


# ---------------------------------------------------------------------- speed model
def roofline_ttft_s(cfg: MobileMoEConfig, device: DeviceProfile, prompt: int) -> float:
    """Prefill of ``prompt`` tokens: every INT4 weight read once vs the prefill FLOPs, whichever is slower."""
    return device.prefill_seconds(accounting.weight_bytes(cfg), accounting.prefill_flops(cfg, prompt))[0]


def roofline_tpot_s(cfg: MobileMoEConfig, device: DeviceProfile, context: int) -> float:
    """One decode step at ``context`` cached positions: the weights a token touches + the KV cache."""
    nbytes = accounting.decode_weight_bytes_per_token(cfg) + accounting.kv_cache_bytes(cfg, context)
    return device.decode_seconds(nbytes, accounting.decode_flops_per_token(cfg, context))[0]


def _interp(points: list[tuple[int, float]], x: float) -> float:
    """Piecewise-linear in x through measured points, extended linearly past the ends (time grows ~ linearly
    with context), never below a small fraction of the nearest measurement."""
    xs = np.array([p[0] for p in points], float)
    ys = np.array([p[1] for p in points], float)
    if len(xs) == 1:
        return float(ys[0])
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return float(max(ys[i] + slope * (x - xs[i]), 0.05 * ys[min(i + (x > xs[i + 1]), len(ys) - 1)]))


@dataclass
class Measured:
    """Measured TTFT (s) and decode time per token (s) of one model at several contexts."""

    model: str  # preset name of the benchmarked model (e.g. mobilemoe-s)
    ttft: list[tuple[int, float]]  # (prompt tokens, seconds)
    tpot: list[tuple[int, float]]  # (context, seconds per token)
    source: str = ""

    def ttft_s(self, prompt: int) -> float:
        return _interp(self.ttft, prompt)

    def tpot_s(self, context: int) -> float:
        return _interp(self.tpot, context)


def load_measured(path: str | os.PathLike) -> Measured:
    """The MoE side of a ``mobilemoe bench --json`` report (keys ``moe_ttft_s_<ctx>``,
    ``moe_decode_tok_s_<ctx>``, ``bench_config.moe``); one clear error for anything else."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DecideError(f"--measured {p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecideError(f"--measured {p}: not a JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise DecideError(f"--measured {p}: expected a JSON object from `mobilemoe bench --json`")
    model = (data.get("bench_config") or {}).get("moe")
    ctxs = sorted(int(k.rsplit("_", 1)[1]) for k in data if k.startswith("moe_ttft_s_") and k.rsplit("_", 1)[1].isdigit())
    if not isinstance(model, str) or not ctxs:
        raise DecideError(f"--measured {p}: not a `mobilemoe bench --json` report (needs bench_config.moe and "
                          "moe_ttft_s_<ctx> / moe_decode_tok_s_<ctx> keys)")
    try:
        ttft = [(c, float(data[f"moe_ttft_s_{c}"])) for c in ctxs]
        tpot = [(c, 1.0 / float(data[f"moe_decode_tok_s_{c}"])) for c in ctxs]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise DecideError(f"--measured {p}: missing or bad measurement ({exc})") from None
    if not all(math.isfinite(v) and v > 0 for _, v in ttft + tpot):
        raise DecideError(f"--measured {p}: measurements must be positive, finite numbers")
    cpu = (data.get("machine") or {}).get("cpu", "")
    return Measured(model, ttft, tpot, f"{p}" + (f" ({cpu})" if cpu else ""))


@dataclass
class SpeedModel:
    """TTFT and decode time of any config on one device: measured where the benchmark covers the model,
    the roofline scaled by the benchmark's measured/roofline ratio for other models, the roofline alone
    without a benchmark."""

    device: DeviceProfile
    measured: Measured | None = None

    def _ratio(self, what: str, x: int) -> float:
        m = self.measured
        ref = preset(m.model)
        if what == "ttft":
            return m.ttft_s(x) / roofline_ttft_s(ref, self.device, x)
        return m.tpot_s(x) / roofline_tpot_s(ref, self.device, x)

    def _source(self, name: str | None) -> str:
        if self.measured is None:
            return "projected"
        return "measured" if name == self.measured.model else "calibrated"

    def ttft(self, cfg: MobileMoEConfig, prompt: int, name: str | None = None) -> tuple[float, str]:
        src = self._source(name)
        if src == "measured":
            return self.measured.ttft_s(prompt), src
        t = roofline_ttft_s(cfg, self.device, prompt)
        return (t * self._ratio("ttft", prompt) if src == "calibrated" else t), src

    def tpot(self, cfg: MobileMoEConfig, context: int, name: str | None = None) -> tuple[float, str]:
        src = self._source(name)
        if src == "measured":
            return self.measured.tpot_s(context), src
        t = roofline_tpot_s(cfg, self.device, context)
        return (t * self._ratio("tpot", context) if src == "calibrated" else t), src

    def describe(self) -> str:
        base = f"roofline of profile {self.device.name} ({self.device.source or self.device.path})"
        if self.measured is None:
            return base
        return f"measured {self.measured.model} from {self.measured.source}; other tiers: {base} x measured/roofline"


# ---------------------------------------------------------------------- decision 1: tier
def budget_gib(device: DeviceProfile, leave_gb: float) -> float:
    """Device RAM minus the reserve for everything else, GiB; an error when nothing is left."""
    if device.memory_gb is None:
        raise DecideError(f"device profile {device.name} gives no memory_gb; add it to the profile")
    if not math.isfinite(leave_gb) or leave_gb < 0:
        raise DecideError(f"--leave-gb: expected a non-negative number, got {leave_gb}")
    gib = device.memory_gb - leave_gb
    if gib <= 0:
        raise DecideError(f"device {device.name} has {device.memory_gb:g} GiB; leaving {leave_gb:g} GiB leaves "
                          "nothing for the model")
    return gib


def tier_decision(device: DeviceProfile, leave_gb: float, context: int = 2048, prompt: int = 256,
                  measured: Measured | None = None) -> dict[str, Any]:
    """The released tiers against ``device`` RAM minus ``leave_gb``: resident memory (INT4 + KV cache at
    ``context``), fit, TTFT of ``prompt`` tokens and decode speed at ``context``, the recommendation."""
    if context < 1 or prompt < 1:
        raise DecideError("--context and --prompt must be positive token counts")
    gib = budget_gib(device, leave_gb)
    speed = SpeedModel(device, measured)
    rows = tier_fit(int(gib * GIB), None, True, context, prompt)
    for r in rows:
        cfg = preset(r["tier"])
        r["max_context"] = cfg.max_position_embeddings
        if context > cfg.max_position_embeddings:
            r["fits"] = r["recommended"] = False
            r["why_not"] = f"context {context} > {cfg.max_position_embeddings}"
        ttft, src_t = speed.ttft(cfg, prompt, r["tier"])
        tpot, src_d = speed.tpot(cfg, context, r["tier"])
        r.update(ttft_s=ttft, ttft_source=src_t, decode_tok_s=1.0 / tpot, decode_source=src_d)
    fitting = [r for r in rows if r["fits"]]
    for r in rows:
        r["recommended"] = bool(fitting) and r is fitting[-1]
    best = fitting[-1] if fitting else None
    if best:
        verdict = (f"ship {best['tier']}: {best['memory_gib']:.2f} GiB resident of {gib:.2f} GiB, leaves "
                   f"{device.memory_gb - best['memory_gib']:.2f} GiB for everything else; ~{best['decode_tok_s']:.0f} "
                   f"tok/s decode ({best['decode_source']})")
    else:
        small = min(rows, key=lambda r: r["memory_gib"])
        verdict = (f"no released tier fits: the smallest ({small['tier']}) needs {small['memory_gib']:.2f} GiB, "
                   f"the budget is {gib:.2f} GiB; leave less or use the cloud")
    return {"device": device.name, "memory_gb": device.memory_gb, "leave_gb": leave_gb, "budget_gib": gib,
            "context": context, "prompt": prompt, "tiers": rows, "recommended": best["tier"] if best else None,
            "speeds_from": speed.describe(), "verdict": verdict}


# ---------------------------------------------------------------------- decision 2: features
@dataclass
class Feature:
    name: str
    prompt_tokens: int
    reply_tokens: int
    context_tokens: int  # the window the feature needs: cached prefix + prompt + reply (default prompt + reply)
    max_ttft_s: float | None = None
    max_reply_s: float | None = None  # time to the full reply
    note: str = ""


_FEATURE_KEYS = ("name", "prompt_tokens", "reply_tokens", "context_tokens", "max_ttft_s", "max_reply_s", "note")


def _pos(rec: dict, key: str, where: str, kind: type) -> Any:
    v = rec.get(key)
    if v is None:
        return None
    ok = (isinstance(v, int) if kind is int else isinstance(v, (int, float))) and not isinstance(v, bool)
    if not ok or not math.isfinite(v) or v <= 0:
        raise DecideError(f"{where}: field '{key}': expected a positive {'integer' if kind is int else 'number'}, "
                          f"got {v!r}")
    return kind(v)


def parse_features(data: Any, where: str = "features") -> list[Feature]:
    """``{features: [{name, prompt_tokens, reply_tokens, [context_tokens], [max_ttft_s], [max_reply_s]}]}``;
    each feature needs at least one latency budget."""
    items = data.get("features") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise DecideError(f"{where}: expected a mapping with a non-empty 'features' list")
    out = []
    for i, rec in enumerate(items):
        w = f"{where}: features[{i}]"
        if not isinstance(rec, dict):
            raise DecideError(f"{w}: expected a mapping, got {type(rec).__name__}")
        unknown = [k for k in rec if k not in _FEATURE_KEYS]
        if unknown:
            raise DecideError(f"{w}: field '{unknown[0]}': unknown (known: {', '.join(_FEATURE_KEYS)})")
        name = rec.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DecideError(f"{w}: field 'name': expected a non-empty string, got {name!r}")
        for key in ("prompt_tokens", "reply_tokens"):
            if key not in rec:
                raise DecideError(f"{w} ({name}): field '{key}': missing")
        p, r = _pos(rec, "prompt_tokens", w, int), _pos(rec, "reply_tokens", w, int)
        ctx = _pos(rec, "context_tokens", w, int) or p + r
        ttft, reply = _pos(rec, "max_ttft_s", w, float), _pos(rec, "max_reply_s", w, float)
        if ttft is None and reply is None:
            raise DecideError(f"{w} ({name}): give a latency budget: max_ttft_s and/or max_reply_s")
        out.append(Feature(name.strip(), p, r, max(ctx, p + r), ttft, reply, str(rec.get("note", ""))))
    return out


def load_features(path: str | os.PathLike) -> list[Feature]:
    from mobilemoe.utils import read_yaml

    p = Path(path)
    if not p.is_file():
        raise DecideError(f"--features {p}: no such file")
    return parse_features(read_yaml(p, DecideError, "features"), str(p))


def feature_decisions(device: DeviceProfile, tier: str, features: Sequence[Feature], leave_gb: float = 4.0,
                      measured: Measured | None = None) -> dict[str, Any]:
    """On-device or cloud for each feature with ``tier`` on ``device`` (RAM minus ``leave_gb``)."""
    if tier not in TIERS:
        raise DecideError(f"--tier {tier!r}: choose one of {', '.join(TIERS)}")
    cfg = preset(tier)
    gib = budget_gib(device, leave_gb)
    speed = SpeedModel(device, measured)
    weights = accounting.weight_bytes(cfg)
    rows = []
    for f in features:
        ttft, src_t = speed.ttft(cfg, f.prompt_tokens, tier)
        # the prefill covers the new prompt tokens (a cached prefix, e.g. a system prompt or the text
        # typed so far, is already in the KV cache); the reply decodes at the window's mean position
        tpot, src_d = speed.tpot(cfg, max(1, f.context_tokens - (f.reply_tokens + 1) // 2), tier)
        reply = ttft + f.reply_tokens * tpot
        resident = (weights + accounting.kv_cache_bytes(cfg, f.context_tokens)) / GIB
        why = []
        if f.context_tokens > cfg.max_position_embeddings:
            why.append(f"context: needs {f.context_tokens} tokens, {tier} supports {cfg.max_position_embeddings}")
        elif resident > gib:
            why.append(f"memory: {resident:.2f} GiB resident at {f.context_tokens} tokens > {gib:.2f} GiB budget")
        if f.max_ttft_s is not None and ttft > f.max_ttft_s:
            why.append(f"latency: TTFT {ttft:.2f} s > {f.max_ttft_s:g} s")
        if f.max_reply_s is not None and reply > f.max_reply_s:
            why.append(f"latency: full reply {reply:.2f} s > {f.max_reply_s:g} s")
        rows.append({"feature": f.name, "prompt_tokens": f.prompt_tokens, "reply_tokens": f.reply_tokens,
                     "context_tokens": f.context_tokens, "max_ttft_s": f.max_ttft_s, "max_reply_s": f.max_reply_s,
                     "ttft_s": ttft, "reply_s": reply, "decode_tok_s": 1.0 / tpot, "resident_gib": resident,
                     "sources": {"ttft": src_t, "decode": src_d},
                     "verdict": "cloud" if why else "on-device", "why": why})
    on = [r["feature"] for r in rows if r["verdict"] == "on-device"]
    verdict = (f"{len(on)} of {len(rows)} features on-device with {tier} on {device.name}"
               + (f": {', '.join(on)}" if on else "") + "; the rest in the cloud")
    return {"device": device.name, "tier": tier, "budget_gib": gib, "leave_gb": leave_gb,
            "max_context": cfg.max_position_embeddings, "features": rows, "speeds_from": speed.describe(),
            "verdict": verdict}


# ---------------------------------------------------------------------- decision 3: ReMoE vs hardware
def storage_latency_us(device: DeviceProfile, default: float = DEFAULT_STORAGE_LATENCY_US) -> float:
    """Random-read latency of the device's storage: the profile's ``storage_latency_us`` where it has one
    (an attribute or in ``extra``), else ``default`` (the profile schema has no such field yet)."""
    v = getattr(device, "storage_latency_us", None) or (device.extra or {}).get("storage_latency_us")
    return float(v) if v else default


def decode_miss_profile(ids: np.ndarray, capacity: int,
                        mask: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per MoE layer: mean misses per counted token and the share of counted tokens with any miss, LRU
    with ``capacity`` slots, the cache carried across sequences (as one runtime serving requests):
    :func:`mobilemoe.remoe.device.miss_profile` on a trace that must count at least one token."""
    from mobilemoe.remoe.device import miss_profile

    ids = np.asarray(ids)
    if ids.shape[1] == 0 or (mask is not None and not np.asarray(mask, bool).any()):
        raise DecideError("the trace has no tokens to count")
    return miss_profile(ids, capacity, "lru", mask)


def offloaded_tpot_s(cfg: MobileMoEConfig, device: DeviceProfile, context: int, means: Sequence[float],
                     probs: Sequence[float], latency_us: float | None = None, per_miss_latency: bool = True) -> float:
    """Decode step with experts offloaded: the in-RAM roofline step plus the missed experts' bytes at the
    storage bandwidth plus the read latency (:func:`mobilemoe.remoe.device.projected_tpot_ms`).

    ``per_miss_latency`` (default): every miss pays one latency -- the native runtime reads each missed
    expert with its own ``preadv``, one after the other; else one latency per layer that misses at all
    (a runtime that batches a layer's reads)."""
    from mobilemoe.remoe.device import StorageProfile, projected_tpot_ms

    lat = storage_latency_us(device) if latency_us is None else latency_us
    store = StorageProfile(device.name, device.storage_bandwidth_gbs, lat)
    compute_ms = 1e3 * roofline_tpot_s(cfg, device, context)
    paid = list(means) if per_miss_latency else list(probs)
    return projected_tpot_ms(means, accounting.runtime_expert_bytes(cfg), store, compute_ms, paid) / 1e3


def remoe_verdict(before_s: float, after_s: float, upgrade_s: float | None, upgrade_cost: float | None,
                  remoe_cost: float = 0.0) -> str:
    """Which buys more decode speed per unit cost: ReMoE (router fine-tuning) or the upgraded device."""
    s_remoe = before_s / after_s
    if upgrade_s is None:
        return (f"ReMoE: {s_remoe:.2f}x decode under offloading" +
                ("; run it before ordering hardware" if s_remoe > 1.02 else "; it does not help this workload"))
    s_up = before_s / upgrade_s
    if s_remoe <= 1.02:
        return f"ReMoE does not help here ({s_remoe:.2f}x); the upgrade gives {s_up:.2f}x"
    if upgrade_cost is not None and remoe_cost > 0:
        per_r, per_u = (s_remoe - 1) / remoe_cost, (s_up - 1) / upgrade_cost
        best = "ReMoE" if per_r >= per_u else "the upgrade"
        return (f"{best} is faster per unit cost: ReMoE +{per_r:.3g}x/unit ({s_remoe:.2f}x for {remoe_cost:g}), "
                f"upgrade +{per_u:.3g}x/unit ({s_up:.2f}x for {upgrade_cost:g})")
    cost = f" for {upgrade_cost:g}" if upgrade_cost is not None else ""
    if s_remoe >= s_up:
        return (f"run ReMoE before ordering hardware: {s_remoe:.2f}x decode with no new hardware, the upgrade "
                f"gives {s_up:.2f}x{cost}")
    return (f"the upgrade is faster ({s_up:.2f}x{cost} vs ReMoE {s_remoe:.2f}x), but ReMoE costs no hardware: "
            "run it first, it also speeds up the upgraded device")


@dataclass
class RemoeInputs:
    """What :func:`remoe_vs_hardware` needs besides the devices: the model's config, the routing traces
    before/after ReMoE of the same workload, and the cache capacity C per MoE layer."""

    cfg: MobileMoEConfig
    before: Any  # mobilemoe.remoe.traces.Trace
    after: Any
    capacity: int
    context: int
    measured: dict[str, Any] = field(default_factory=dict)  # measured_tpot() output, when run


def remoe_vs_hardware(inp: RemoeInputs, device: DeviceProfile, upgrade: DeviceProfile | None = None,
                      upgrade_cost: float | None = None, remoe_cost: float = 0.0,
                      latency_us: float | None = None) -> dict[str, Any]:
    """Decode TPOT under expert offloading: before ReMoE, after ReMoE (``device``), and before ReMoE on
    ``upgrade``; measured TPOT (this machine) where given; the verdict."""
    cfg, C, ctx = inp.cfg, inp.capacity, inp.context
    prof = {k: decode_miss_profile(t.ids, C) for k, t in (("before", inp.before), ("after", inp.after))}
    rows: dict[str, dict[str, Any]] = {}
    for name, dev, routers in (("before ReMoE", device, "before"), ("after ReMoE", device, "after")) + (
            (("upgrade, before ReMoE", upgrade, "before"), ("upgrade + ReMoE", upgrade, "after")) if upgrade else ()):
        means, probs = prof[routers]
        t = offloaded_tpot_s(cfg, dev, ctx, means, probs, latency_us)
        rows[name] = {"device": dev.name, "routers": routers, "misses_per_token": float(sum(means)),
                      "tpot_ms": 1e3 * t, "decode_tok_s": 1.0 / t, "source": "projected"}
    calib = None
    if inp.measured:
        mb, ma = (inp.measured[k]["offloaded"]["tpot_ms"] for k in ("before", "after"))
        calib = mb / rows["before ReMoE"]["tpot_ms"]
        for name, m in (("before ReMoE", mb), ("after ReMoE", ma)):
            rows[name].update(projected_tpot_ms=rows[name]["tpot_ms"], tpot_ms=m, decode_tok_s=1e3 / m,
                              source="measured", measured_misses_per_token=inp.measured[
                                  "before" if name.startswith("before") else "after"]["offloaded"]["misses_per_token"])
        for name in ("upgrade, before ReMoE", "upgrade + ReMoE"):
            if name in rows:  # the measured/projected ratio of this device carries the runtime's overheads
                rows[name].update(projected_tpot_ms=rows[name]["tpot_ms"], tpot_ms=rows[name]["tpot_ms"] * calib,
                                  source="calibrated")
                rows[name]["decode_tok_s"] = 1e3 / rows[name]["tpot_ms"]
    up = rows.get("upgrade, before ReMoE", {}).get("tpot_ms")
    verdict = remoe_verdict(rows["before ReMoE"]["tpot_ms"], rows["after ReMoE"]["tpot_ms"], up, upgrade_cost,
                            remoe_cost)
    return {"device": device.name, "upgrade": upgrade.name if upgrade else None, "capacity": C,
            "experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok, "context": ctx,
            "trace_tokens": int(inp.before.ids.shape[1]), "expert_bytes": accounting.runtime_expert_bytes(cfg),
            "storage_latency_us": storage_latency_us(device) if latency_us is None else latency_us,
            "calibration": calib, "rows": rows, "upgrade_cost": upgrade_cost, "remoe_cost": remoe_cost,
            "verdict": verdict}


# ---------------------------------------------------------------------- this machine's profile
def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs; 32 MiB when unknown): DRAM probes must stream well beyond it."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def measure_int4(rows: int, out_features: int = 4096, in_features: int = 4096, working_set: int = 0,
                 repeats: int = 5) -> dict[str, float]:
    """Time ``x[rows, in] @ W.T`` over random INT4 weights with the native kernels: one packed matrix,
    copied until the weights span ``working_set`` bytes (0: one copy). Seconds per pass over all copies,
    weight GB/s and GFLOP/s (best of ``repeats``)."""
    import torch

    from mobilemoe.kernels import PackedLinear

    gen = torch.Generator().manual_seed(0)
    w0 = PackedLinear.from_quantized(
        torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, generator=gen),
        torch.full((out_features, in_features // 32), 0.01, dtype=torch.float16))
    copies = max(1, -(-working_set // w0.nbytes))
    ws = [w0] + [PackedLinear(w0.data.clone(), out_features, in_features) for _ in range(copies - 1)]
    x = torch.randn(rows, in_features, generator=gen)

    def run() -> None:
        for w in ws:
            w(x)

    s = _best_seconds(run, repeats)
    return {"seconds": s, "weight_gbs": copies * w0.nbytes / s / 1e9, "working_set_bytes": copies * w0.nbytes,
            "gflops": 2.0 * rows * out_features * in_features * copies / s / 1e9}


def _memory_gib() -> float | None:
    from mobilemoe.bench.system import memory_bytes

    total = memory_bytes()["total"]
    return round(total / 2**30, 1) if total else None


def measure_profile(name: str = "this-machine", gemm_rows: int = 256, quick: bool = False,
                    repeats: int = 5) -> dict[str, Any]:
    """This machine's device profile, measured: DRAM read bandwidth (torch), INT4 GEMV weight streaming
    (decode; sets bandwidth_efficiency), INT4 x int8 GEMM throughput (prefill; compute_gflops.int8 at
    compute_efficiency 1, it is what the kernels achieve), disk read bandwidth and latency.
    Each is the best of ``repeats`` (the least disturbed by other load on the machine).
    Returns ``{"profile": <YAML-ready dict>, "measurements": {...}}``. ``quick``: smaller buffers (tests)."""
    import torch

    from mobilemoe.bench.system import cpu_model, dram_read_bandwidth_gbs
    from mobilemoe.remoe.device import measure_local_disk

    # twice the last-level cache (at least 256 MiB, at most 2 GiB): the GEMV streams DRAM as a decoder does
    stream = 16 << 20 if quick else min(max(2 * last_level_cache_bytes(), 256 << 20), 2 << 30)
    dram = dram_read_bandwidth_gbs(working_set_bytes=stream, repeats=repeats)
    gemv = measure_int4(1, out_features=1024 if quick else 8192, in_features=4096, working_set=stream,
                        repeats=repeats)
    gemm = measure_int4(gemm_rows if not quick else 16, out_features=1024 if quick else 4096, repeats=repeats)
    disk = measure_local_disk(size_mb=8 if quick else 64, reads=16 if quick else 64)
    bw = max(dram, gemv["weight_gbs"])
    prof = {
        "name": name,
        "description": f"{cpu_model()}, {torch.get_num_threads()} threads (measured by `mobilemoe decide profile`)",
        "memory_gb": _memory_gib(),
        "memory_bandwidth_gbs": round(bw, 2),
        "bandwidth_efficiency": round(min(1.0, gemv["weight_gbs"] / bw), 3),
        "compute_gflops": {"int8": round(gemm["gflops"], 1)},
        "compute_efficiency": 1.0,
        "decode_dtype": "int8",
        "prefill_dtype": "int8",
        "storage_bandwidth_gbs": round(max(disk.bandwidth_gbps, 1e-3), 3),
        "source": (f"measured {time.strftime('%Y-%m-%d %H:%M')}: DRAM read {dram:.1f} GB/s, INT4 GEMV "
                   f"{gemv['weight_gbs']:.1f} GB/s, INT4 GEMM ({gemm_rows if not quick else 16} rows) "
                   f"{gemm['gflops']:.0f} GFLOP/s, disk {disk.bandwidth_gbps:.2f} GB/s, {disk.latency_us:.0f} us/read"),
    }
    if prof["memory_gb"] is None:
        del prof["memory_gb"]
    return {"profile": prof, "measurements": {"dram_read_gbs": dram, "int4_gemv": gemv, "int4_gemm": gemm,
                                              "disk_gbs": disk.bandwidth_gbps, "disk_latency_us": disk.latency_us,
                                              "threads": torch.get_num_threads()}}


def write_profile(prof: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a profile dict as YAML (validated first by the profile loader's own rules)."""
    import yaml

    from mobilemoe.scaling.profiles import profile_from_dict
    from mobilemoe.utils import atomic_write_text

    profile_from_dict(prof, str(path))
    p = Path(path)
    atomic_write_text(p, "# measured by `mobilemoe decide profile`; see mobilemoe/scaling/profiles.py\n"
                      + yaml.safe_dump(prof, sort_keys=False))
    return p
