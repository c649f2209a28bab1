"""The architecture planner: the best architectures under a memory (INT4 bytes) and compute budget.

:func:`plan` enumerates the design space (:mod:`.space`), keeps the points whose INT4 weights (and
optionally KV cache) fit the memory budget and whose decode FLOPs per token fit the compute budget,
predicts each one's loss with the scaling law (:mod:`.law`) at the planned training tokens, keeps the
Pareto-optimal ones on (predicted loss, INT4 bytes, decode FLOPs/token) and ranks them by loss.
With a device profile it adds a roofline projection of prefill/decode speed (:mod:`.profiles`).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from mobilemoe.errors import MobileMoEError
from mobilemoe.scaling.law import Law, default_law
from mobilemoe.scaling.profiles import DeviceProfile
from mobilemoe.scaling.space import Arch, ArchStats, SpaceSpec, rule_layers, stats, tier_arch

GIB = 2**30
DEFAULT_TOKENS = 6e12
DEFAULT_PLANNER_SPACE = SpaceSpec(
    d_models=tuple(range(256, 3073, 64)), layer_slack=(-1, 0, 1),
    experts=(1, 2, 4, 6, 8, 12, 16, 24, 32), top_k=(1, 2), granularity=(1, 2, 4, 8, 16),
    shared=("none", "half"))
DEFAULT_NOTE = ("predicted losses use the DEFAULT law constants shipped with mobilemoe "
                "(illustrative, calibrated to reproduce the paper's qualitative sweet spot), not a fit "
                "to your data: run `mobilemoe sweep` and fit a law, then pass --law for real predictions")


class PlanError(MobileMoEError, ValueError):
    """No architecture satisfies the budgets (the message says what the smallest candidate needs)."""


@functools.lru_cache(maxsize=200_000)
def cached_stats(arch: Arch, context: int, prompt: int) -> ArchStats:
    return stats(arch, context=context, prompt=prompt)


@dataclass
class Candidate:
    st: ArchStats
    loss: float
    memory_bytes: int  # what the budget is checked against (INT4 weights [+ KV cache])
    speed: dict[str, Any] = field(default_factory=dict)
    pareto: bool = False

    @property
    def arch(self) -> Arch:
        return self.st.arch

    def to_dict(self) -> dict[str, Any]:
        out = self.st.to_dict()
        out.update(predicted_loss=self.loss, memory_bytes=self.memory_bytes,
                   memory_gib=self.memory_bytes / GIB, pareto=self.pareto, kind="dense" if self.arch.is_dense else "moe")
        if self.speed:
            out["speed"] = self.speed
        return out


@dataclass
class PlanResult:
    budget_bytes: int | None
    flops_budget: float | None
    tokens: float
    law_is_default: bool
    law_source: str
    ranked: list[Candidate]  # Pareto-optimal, best predicted loss first
    evaluated: list[Candidate]  # every feasible candidate (for the frontier plot)
    best_dense: Candidate | None
    best_moe: Candidate | None
    device: DeviceProfile | None = None
    notes: list[str] = field(default_factory=list)
    count_kv: bool = False
    context: int = 2048
    prompt: int = 1024
    n_feasible: int = 0

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        ranked = self.ranked[:top] if top else self.ranked
        return {
            "budget_bytes": self.budget_bytes,
            "budget_gib": None if self.budget_bytes is None else self.budget_bytes / GIB,
            "flops_per_token_budget": self.flops_budget, "tokens": self.tokens,
            "memory_counts_kv_cache": self.count_kv, "context": self.context, "prompt": self.prompt,
            "law": {"default": self.law_is_default, "source": self.law_source},
            "device": self.device.to_dict() if self.device else None,
            "notes": self.notes,
            "candidates_feasible": self.n_feasible,
            "ranked": [c.to_dict() for c in ranked],
            "best_dense": self.best_dense.to_dict() if self.best_dense else None,
            "best_moe": self.best_moe.to_dict() if self.best_moe else None,
        }


def project_speed(st: ArchStats, device: DeviceProfile) -> dict[str, Any]:
    """Roofline decode/prefill speed of one architecture on one device."""
    dec_bytes = st.decode_bytes_per_token + st.kv_cache_bytes  # weights a token touches + KV cache read
    t_dec, dec_bound = device.decode_seconds(dec_bytes, st.decode_flops_per_token)
    t_pre, pre_bound = device.prefill_seconds(st.int4_bytes, st.prefill_flops_per_token * st.prompt)
    return {"device": device.name, "decode_tok_s": 1.0 / t_dec, "decode_bound": dec_bound,
            "prefill_tok_s": st.prompt / t_pre, "prefill_bound": pre_bound,
            "load_s": device.load_seconds(st.int4_bytes), "context": st.context, "prompt": st.prompt}


def _pareto(cands: list[Candidate]) -> list[Candidate]:
    """Non-dominated on (loss, memory bytes, decode FLOPs), all minimised; sorted by loss."""
    front: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.loss, c.memory_bytes, c.st.decode_flops_per_token)):
        dominated = any(f.memory_bytes <= c.memory_bytes and f.st.decode_flops_per_token <= c.st.decode_flops_per_token
                        for f in front)
        if not dominated:
            c.pareto = True
            front.append(c)
    return front


def _groups(spec: SpaceSpec):
    """(E, k, g, s) combinations of the space (dense first), each to be walked over d_model."""
    combos = [(1, 1, 1, 0)] if spec.include_dense else []
    for E, k, g, mode in itertools.product(spec.experts, spec.top_k, spec.granularity, spec.shared):
        if E <= k:
            continue
        s = spec.shared_slots(mode, k, g)
        if s < k * g and (E, k, g, s) not in combos:
            combos.append((E, k, g, s))
    return combos


def smallest_candidate(spec: SpaceSpec, context: int = 2048, prompt: int = 1024, count_kv: bool = False,
                       by: str = "memory"):
    """The candidate of the space with the fewest memory bytes (``by="memory"``) or decode FLOPs/token
    (``by="flops"``), as ``(stats, value)`` (for the impossible-budget message)."""
    best = None
    d = min(spec.d_models)
    layers = max(1, rule_layers(d, spec.aspect) + min(spec.layer_slack))
    for E, k, g, s in _groups(spec):
        st = _feasible_stats(Arch(d_model=d, layers=layers, E=E, k=k, g=g, s=s, vocab=spec.vocab), context, prompt)
        if st is None:
            continue
        value = (st.int4_bytes + (st.kv_cache_bytes if count_kv else 0)) if by == "memory" else st.decode_flops_per_token
        if best is None or value < best[1]:
            best = (st, value)
    return best


def _feasible_stats(a: Arch, context: int, prompt: int):
    """The architecture's stats, or None if it is invalid or cannot be packed as group-32 INT4."""
    try:
        a.check()
    except MobileMoEError:
        return None
    return cached_stats(a, context, prompt) if a.int4_ok() else None


def evaluate_space(law: Law, tokens: float, max_bytes: int | None, max_flops: float | None,
                   spec: SpaceSpec | None = None, context: int = 2048, prompt: int = 1024,
                   count_kv: bool = False) -> tuple[list[Candidate], int]:
    """Every feasible candidate with its predicted loss; also the count the law could not score."""
    spec = spec or DEFAULT_PLANNER_SPACE
    out: list[Candidate] = []
    unscored = 0
    for E, k, g, s in _groups(spec):
        for slack in spec.layer_slack:
            for d in sorted(spec.d_models):
                layers = rule_layers(d, spec.aspect) + slack
                if layers < 1:
                    continue
                a = Arch(d_model=d, layers=layers, E=E, k=k, g=g, s=s, vocab=spec.vocab)
                st = _feasible_stats(a, context, prompt)
                if st is None:
                    continue
                mem = st.int4_bytes + (st.kv_cache_bytes if count_kv else 0)
                if max_bytes is not None and mem > max_bytes:
                    break  # bytes grow with d_model along this walk
                if max_flops is not None and st.decode_flops_per_token > max_flops:
                    break
                fam = "dense" if a.is_dense else a.family.key()
                loss = law.predict(st.active_params, tokens, a.e_law, fam, g=a.g, s=a.s)
                if loss is None or not math.isfinite(loss):
                    unscored += 1
                    continue
                out.append(Candidate(st=st, loss=loss, memory_bytes=mem))
    return out, unscored


def plan(memory_gb: float | None = None, flops_per_token: float | None = None, tokens: float = DEFAULT_TOKENS,
         law: Law | None = None, device: DeviceProfile | None = None, spec: SpaceSpec | None = None,
         decimal_gb: bool = False, leave_gb: float | None = None, count_kv: bool = False,
         context: int = 2048, prompt: int = 1024, plot_range: float | None = None) -> PlanResult:
    """Pareto-optimal architectures under the budgets, best predicted loss first.

    ``memory_gb``: budget for the INT4 weights in GiB (``decimal_gb``: 1e9 bytes). ``leave_gb``
    with a ``device`` (with ``memory_gb``) sets the budget to the device RAM minus that reserve and
    counts the KV cache at ``context`` too. ``flops_per_token``: decode FLOPs/token at ``context``.
    ``plot_range``: also evaluate up to this multiple of the budget (for the frontier plot).
    """
    spec = spec or DEFAULT_PLANNER_SPACE
    notes: list[str] = []
    unit = 1e9 if decimal_gb else GIB
    unit_name = "GB" if decimal_gb else "GiB"
    if leave_gb is not None:
        if device is None or device.memory_gb is None:
            raise PlanError("--leave-gb needs --device with a profile that gives memory_gb")
        free = device.memory_gb - leave_gb
        if memory_gb is not None:
            free = min(free, memory_gb)
        if free <= 0:
            raise PlanError(f"device {device.name} has {device.memory_gb} GiB; leaving {leave_gb} GiB leaves nothing "
                            "for the model")
        memory_gb = free
        count_kv = True
        unit, unit_name = GIB, "GiB"
        notes.append(f"budget = {device.name} RAM {device.memory_gb} GiB - {leave_gb} GiB reserve = "
                     f"{free:.2f} GiB for INT4 weights + KV cache at {context} tokens")
    for name, v in (("memory-gb", memory_gb), ("flops-per-token", flops_per_token), ("tokens", tokens)):
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise PlanError(f"option '--{name}': expected a positive number, got {v}")
    if memory_gb is None and flops_per_token is None:
        raise PlanError("give a memory budget (--memory-gb) and/or a compute budget (--flops-per-token)")
    budget = int(memory_gb * unit) if memory_gb is not None else None
    law = law or default_law()
    if law.is_default:
        notes.insert(0, DEFAULT_NOTE)

    limit = budget if budget is None or plot_range is None else int(budget * plot_range)
    evaluated, unscored = evaluate_space(law, tokens, limit, flops_per_token, spec, context, prompt, count_kv)
    if unscored:
        notes.append(f"{unscored} candidates were skipped: the law has no constants for their family/E "
                     f"(families fitted: {', '.join(sorted(law.families))})")
    feasible = [c for c in evaluated if budget is None or c.memory_bytes <= budget]
    if not feasible:
        what = []
        small = smallest_candidate(spec, context, prompt, count_kv)
        if budget is not None and small is not None and small[1] > budget:
            what.append(f"no architecture fits {memory_gb:g} {unit_name}: the smallest candidate "
                        f"({small[0].arch.label()}) needs {small[1] / unit:.3g} {unit_name}"
                        + (" (INT4 weights + KV cache)" if count_kv else " of INT4 weights"))
        if not what and flops_per_token is not None:
            cheap = smallest_candidate(spec, context, prompt, count_kv, by="flops")
            within = f" within {memory_gb:g} {unit_name}" if memory_gb is not None else ""
            need = f": the cheapest candidate ({cheap[0].arch.label()}) needs {cheap[1]:.3g}" if cheap else ""
            what.append(f"no architecture{within} decodes with at most {flops_per_token:.3g} FLOPs/token at "
                        f"context {context}{need}")
        if not any(what) and unscored:
            what.append("the law could not score any candidate that fits (fit more families or use the default law)")
        if not any(what):
            what.append("no candidate satisfies the budgets")
        raise PlanError("; ".join(w for w in what if w))

    front = _pareto(feasible)
    if device is not None:
        for c in front:
            c.speed = project_speed(c.st, device)
    best_dense = min((c for c in feasible if c.arch.is_dense), key=lambda c: c.loss, default=None)
    best_moe = min((c for c in feasible if not c.arch.is_dense), key=lambda c: c.loss, default=None)
    for c in (best_dense, best_moe):
        if c is not None and device is not None and not c.speed:
            c.speed = project_speed(c.st, device)
    return PlanResult(budget_bytes=budget, flops_budget=flops_per_token, tokens=tokens,
                      law_is_default=law.is_default, law_source=law.source or "(in memory)", ranked=front,
                      evaluated=evaluated, best_dense=best_dense, best_moe=best_moe, device=device, notes=notes,
                      count_kv=count_kv, context=context, prompt=prompt, n_feasible=len(feasible))


# ---------------------------------------------------------------------- tiers + plot
PUBLISHED_TIERS = {  # name: (active params, total params, published INT4 "GB")
    "mobilemoe-s": (0.27e9, 1.3e9, 0.68),
    "mobilemoe-m": (0.53e9, 2.8e9, 1.48),
    "mobilemoe-l": (0.92e9, 5.3e9, 2.75),
}


def tier_comparison(law: Law | None = None, tokens: float = DEFAULT_TOKENS, spec: SpaceSpec | None = None,
                    modes: tuple[str, ...] = ("memory", "memory+flops"), context: int = 2048,
                    prompt: int = 1024) -> list[dict[str, Any]]:
    """Plan at each published tier's INT4 budget (read as GiB) and compare the best proposal with the tier.

    Mode ``memory``: the INT4 budget only; ``memory+flops``: also the tier's decode FLOPs/token at
    ``context`` (the paper optimises under both)."""
    rows = []
    for name, (act, tot, gb) in PUBLISHED_TIERS.items():
        tier = cached_stats(tier_arch(name), context, prompt)
        for mode in modes:
            flops = tier.decode_flops_per_token if mode == "memory+flops" else None
            res = plan(memory_gb=gb, flops_per_token=flops, tokens=tokens, law=law, spec=spec, context=context,
                       prompt=prompt)
            b = res.ranked[0]
            rows.append({"tier": name, "budget": mode, "budget_gib": gb, "flops_budget": flops,
                         "tier_arch": tier.arch.label(), "tier_active": tier.active_params,
                         "tier_total": tier.total_params, "tier_int4_gib": tier.int4_gib,
                         "published_active": act, "published_total": tot, "plan_arch": b.arch.label(),
                         "plan_active": b.st.active_params, "plan_total": b.st.total_params,
                         "plan_int4_gib": b.st.int4_gib, "active_ratio": b.st.active_params / tier.active_params,
                         "total_ratio": b.st.total_params / tier.total_params, "plan_loss": b.loss,
                         "best_dense_loss": res.best_dense.loss if res.best_dense else None})
    return rows


def tier_fit(budget_bytes: int | None, device: DeviceProfile | None = None, count_kv: bool = False,
             context: int = 2048, prompt: int = 1024) -> list[dict[str, Any]]:
    """The published tiers (released checkpoints) against a memory budget: which fit, and how fast.
    The largest one that fits is marked ``recommended``."""
    rows = []
    for name in PUBLISHED_TIERS:
        st = cached_stats(tier_arch(name), context, prompt)
        mem = st.int4_bytes + (st.kv_cache_bytes if count_kv else 0)
        row = {"tier": name, "arch": st.arch.label(), "active_params": st.active_params,
               "total_params": st.total_params, "int4_gib": st.int4_gib, "kv_cache_gib": st.kv_cache_bytes / GIB,
               "memory_gib": mem / GIB, "fits": budget_bytes is None or mem <= budget_bytes, "recommended": False}
        if device is not None:
            row["speed"] = project_speed(st, device)
        rows.append(row)
    fitting = [r for r in rows if r["fits"]]
    if fitting:
        fitting[-1]["recommended"] = True
    return rows


def plot_frontier(result: PlanResult, path: str, tiers: bool = True) -> None:
    """Predicted loss vs INT4 memory: every evaluated candidate, the MoE and dense lower envelopes,
    the budget, the recommended architecture and the published tiers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for kind, color in (("moe", "tab:blue"), ("dense", "tab:orange")):
        pts = sorted(((c.memory_bytes / GIB, c.loss) for c in result.evaluated if (c.arch.is_dense) == (kind == "dense")))
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, alpha=0.15, color=color)
        env, best = [], float("inf")
        for x, y in pts:
            if y < best:
                best = y
                env.append((x, y))
        ax.plot([p[0] for p in env], [p[1] for p in env], color=color, lw=2,
                label=f"{'MoE' if kind == 'moe' else 'dense'} frontier")
    if result.budget_bytes is not None:
        ax.axvline(result.budget_bytes / GIB, color="gray", ls="--", lw=1, label="budget")
    if result.ranked:
        b = result.ranked[0]
        ax.scatter([b.memory_bytes / GIB], [b.loss], marker="*", s=180, color="tab:red", zorder=5,
                   label=f"recommended: {b.arch.label()}")
    if tiers and not result.count_kv:
        for name in PUBLISHED_TIERS:
            st = cached_stats(tier_arch(name), result.context, result.prompt)
            ax.axvline(st.int4_gib, color="tab:green", ls=":", lw=0.8)
            ax.text(st.int4_gib, ax.get_ylim()[1], name.split("-")[-1].upper(), color="tab:green",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("INT4 weights (GiB)" + (" + KV cache" if result.count_kv else ""))
    ax.set_ylabel(f"predicted loss at {result.tokens:.2g} tokens")
    title = "MobileMoE planner frontier"
    if result.law_is_default:
        title += " (DEFAULT law constants)"
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: PlanResult, top: int = 10) -> str:
    lines = []
    for n in result.notes:
        lines.append(f"NOTE: {n}")
    b = "none" if result.budget_bytes is None else f"{result.budget_bytes / GIB:.3f} GiB"
    f = "none" if result.flops_budget is None else f"{result.flops_budget:.3g}"
    lines.append(f"budget: memory {b}{' (INT4 weights + KV cache)' if result.count_kv else ' (INT4 weights)'}, "
                 f"decode FLOPs/token {f}; planned training tokens {result.tokens:.3g}; "
                 f"{result.n_feasible} candidates fit, {len(result.ranked)} Pareto-optimal")
    hdr = f"{'#':>2}  {'pred.loss':>9}  {'active':>7}  {'total':>7}  {'INT4 GiB':>8}  {'GFLOP/tok':>9}"
    if result.device:
        hdr += f"  {'decode t/s':>10}  {'prefill t/s':>11}"
    hdr += "  architecture"
    lines.append(hdr)
    for i, c in enumerate(result.ranked[:top], 1):
        row = (f"{i:>2}  {c.loss:>9.4f}  {c.st.active_params / 1e9:>6.3f}B  {c.st.total_params / 1e9:>6.3f}B  "
               f"{c.st.int4_gib:>8.3f}  {c.st.decode_flops_per_token / 1e9:>9.3f}")
        if result.device:
            row += f"  {c.speed['decode_tok_s']:>10.1f}  {c.speed['prefill_tok_s']:>11.0f}"
        lines.append(row + f"  {c.arch.label()}")
    if result.best_dense is not None and result.best_moe is not None:
        lines.append(f"best dense: loss {result.best_dense.loss:.4f} ({result.best_dense.arch.label()}); "
                     f"best MoE: loss {result.best_moe.loss:.4f} ({result.best_moe.arch.label()})")
    if result.device:
        lines.append(f"speeds: roofline on {result.device.name} (decode at context {result.context}, "
                     f"prefill of {result.prompt} tokens); projections, not measurements")
    return "\n".join(lines)
