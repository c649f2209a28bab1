"""Before/after evaluation: perplexity, EOR, cache hit rates, Proposition 3.1 bound, projected TPOT, and
real decode TPOT in the expert-offloading runtime (:func:`measured_tpot`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mobilemoe.remoe.adapters import Adapter, MobileMoEAdapter
from mobilemoe.remoe.cache_sim import POLICIES, analyze
from mobilemoe.remoe.device import PROFILES, StorageProfile, miss_profile, projected_tpot_ms
from mobilemoe.remoe.traces import Trace, trace_sequences


def expert_bytes(adapter: Adapter, fmt: str = "int4") -> int:
    """Bytes of one routed expert in ``fmt`` (int4: packed codes + fp16 scale per 32)."""
    from mobilemoe.accounting import int4_bytes

    if isinstance(adapter, MobileMoEAdapter):
        from mobilemoe.accounting import routed_expert_bytes

        return routed_expert_bytes(adapter.model.config, fmt)
    # transformers: stacked expert tensors under the MoE block's `experts` module of the first router's block
    name = adapter.router_param_names()[0].rsplit(".", 2)[0]  # e.g. model.layers.0.mlp
    numel = sum(p.numel() for n, p in adapter.model.named_parameters() if n.startswith(name + ".experts."))
    per = numel // adapter.num_experts
    return int4_bytes(per) if fmt == "int4" else per * 2


@torch.no_grad()
def perplexity(adapter: Adapter, windows: Sequence[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        x, y = w[:, :-1], w[:, 1:]
        logits = adapter._lm_logits(x)
        nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        n += y.numel()
    return math.exp(nll / max(n, 1))


def evaluate(adapter: Adapter, windows: Sequence[torch.Tensor], capacity: int | None = None,
             policies: Sequence[str] = POLICIES, profiles: dict[str, StorageProfile] | None = None,
             compute_ms: float = 0.0, trace: Trace | None = None) -> dict[str, Any]:
    """One model on deterministic validation windows [1, T+1]: ppl + routing/caching metrics."""
    ppl = perplexity(adapter, windows)
    tr = trace or trace_sequences(adapter, [w[:, :-1] for w in windows], "validation")
    K = adapter.top_k
    C = capacity or K
    eb = expert_bytes(adapter)
    rep = analyze(tr.ids, C, policies, eb, tr.seq_starts)
    means, probs = miss_profile(tr.ids, C, "lru")
    tpot = {name: projected_tpot_ms(means, eb, prof, compute_ms, probs)
            for name, prof in (profiles or PROFILES).items()}
    return {"perplexity": ppl, "eor": rep.eor, "eor_per_layer": rep.eor_per_layer,
            "bound_misses_per_token": rep.bound_misses_per_token, "capacity": C, "top_k": K,
            "expert_bytes": eb, "tokens": tr.num_tokens,
            "hit_rate": {p: rep.policies[p]["hit_rate"] for p in policies},
            "misses_per_token": {p: rep.policies[p]["misses_per_token"] for p in policies},
            "bytes_per_token": {p: rep.policies[p]["bytes_per_token"] for p in policies},
            "tpot_ms": tpot, "trace": tr}


def compare(before: dict, after: dict) -> dict[str, Any]:
    """Relative / absolute changes of the headline metrics."""
    def rel(a, b):
        return (b - a) / a if a else float("nan")
    out = {"eor_before": before["eor"], "eor_after": after["eor"], "eor_rel_change": rel(before["eor"], after["eor"]),
           "ppl_before": before["perplexity"], "ppl_after": after["perplexity"],
           "ppl_rel_change": rel(before["perplexity"], after["perplexity"])}
    for p in before["hit_rate"]:
        out[f"{p}_hit_before"] = before["hit_rate"][p]
        out[f"{p}_hit_after"] = after["hit_rate"][p]
    for name in before["tpot_ms"]:
        out[f"tpot_ms_{name}_before"] = before["tpot_ms"][name]
        out[f"tpot_ms_{name}_after"] = after["tpot_ms"][name]
    return out


def strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "trace"}


def phase_eor(trace: Trace, phase: int = 1) -> float:
    """EOR over consecutive token pairs that are both in ``phase`` (1: generated tokens) of one sequence."""
    from mobilemoe.remoe.cache_sim import overlap_per_token

    ph = np.asarray(trace.phase)
    ok = (ph[1:] == phase) & (ph[:-1] == phase)
    for s in trace.seq_starts:
        if 0 < s < len(ph):
            ok[s - 1] = False
    if not ok.any():
        return float("nan")
    vals = [overlap_per_token(trace.ids[l])[ok].mean() for l in range(trace.ids.shape[0])]
    return float(np.mean(vals))


def _int4_for(adapter: Adapter, work: Path) -> Path:
    """Save and quantize a MobileMoE adapter's model under ``work`` (reused when present)."""
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.quant import quantize_checkpoint

    if not isinstance(adapter, MobileMoEAdapter):
        raise MobileMoEError("measured TPOT needs a MobileMoE model (the offloading runtime runs the INT4 format); "
                             "use the projected TPOT for other families")
    int4 = work / "int4"
    if not (int4 / "config.json").exists():
        save_checkpoint(adapter.model, work / "float")
        quantize_checkpoint(work / "float", int4, overwrite=True)
    return int4


def _decode_round(engine, prompts: Sequence[torch.Tensor], gen_tokens: int) -> dict[str, float]:
    """Greedy-decode ``gen_tokens`` after each prompt; seconds and offload counters of the decode steps."""
    offloaded = getattr(engine.backend, "capacity", None) is not None
    keys = ("hits", "misses", "bytes_read", "read_seconds")
    acc = dict.fromkeys(("seconds", "steps") + (keys if offloaded else ()), 0.0)
    for p in prompts:
        engine.reset()
        logits = engine.prefill(p.reshape(-1).tolist())
        before = engine.backend.offload_stats() if offloaded else None
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            logits = engine.decode(int(torch.argmax(logits)))
        acc["seconds"] += time.perf_counter() - t0
        acc["steps"] += gen_tokens
        if offloaded:
            after = engine.backend.offload_stats()
            for k in keys:
                acc[k] += after[k] - before[k]
    return acc


def measured_tpot(adapters: dict[str, Adapter], prompts: Sequence[torch.Tensor], gen_tokens: int, capacity: int,
                  workdir: str | Path, rounds: int = 3, drop_page_cache: bool = True) -> dict[str, dict[str, Any]]:
    """Real decode time per output token of each model in the native INT4 runtime with its experts
    offloaded (C = ``capacity`` cached per MoE layer, misses read from its expert store file), next to
    the same runtime with every expert in RAM.

    All models are timed in one process, in ``rounds`` rounds that alternate the order, so machine
    noise hits them alike; TPOT is the median over rounds. Greedy decoding of ``gen_tokens`` after each
    prompt; the counters cover the decode steps only (the prefill's reads are excluded). MobileMoE
    models only: each is saved, quantized to INT4 and written to an expert store under
    ``workdir/<name>`` (reused when present)."""
    import statistics

    from mobilemoe.runtime import Engine, ExpertOffload

    engines: dict[tuple[str, str], Any] = {}
    for name, adapter in adapters.items():
        work = Path(workdir) / name
        int4 = _int4_for(adapter, work)
        engines[(name, "in_ram")] = Engine.load(int4, backend="native")
        engines[(name, "offloaded")] = Engine.load(int4, backend="native", offload=ExpertOffload(
            capacity=capacity, store_dir=work / "expert-store", drop_page_cache=drop_page_cache))
    runs: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in engines}
    order = list(engines)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            runs[key].append(_decode_round(engines[key], prompts, gen_tokens))
    out: dict[str, dict[str, Any]] = {}
    for name in adapters:
        res: dict[str, Any] = {"capacity": capacity, "gen_tokens": gen_tokens, "prompts": len(prompts),
                               "rounds": rounds, "drop_page_cache": drop_page_cache}
        for mode in ("in_ram", "offloaded"):
            rs = runs[(name, mode)]
            m = {"tpot_ms": statistics.median(1e3 * x["seconds"] / x["steps"] for x in rs)}
            if mode == "offloaded":
                tot = {k: sum(x[k] for x in rs) for k in ("hits", "misses", "bytes_read", "read_seconds", "steps")}
                m.update(misses_per_token=tot["misses"] / tot["steps"],
                         hit_rate=tot["hits"] / max(tot["hits"] + tot["misses"], 1),
                         bytes_per_token=tot["bytes_read"] / tot["steps"],
                         read_ms_per_token=1e3 * tot["read_seconds"] / tot["steps"],
                         read_us_per_miss=1e6 * tot["read_seconds"] / max(tot["misses"], 1))
            res[mode] = m
        out[name] = res
    return out
