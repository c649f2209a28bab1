"""The joint MoE scaling law (Ludziejewski et al. 2025) and its robust fit.

    L(N_act, D, E) = a * E^delta * N_act^(alpha + gamma ln E) + b * E^omega * D^(beta + zeta ln E) + c

``N_act``: active parameters per token (:func:`mobilemoe.accounting.active_params`, tied embedding
counted once, the paper's 0.27B for S); ``D``: training tokens; ``E``: the expansion ratio
``E_coarse / k`` of :mod:`mobilemoe.scaling.space` (1 = dense, so the law is Chinchilla's there).
Exponents are signed as written: ``alpha`` and ``beta`` are negative.

Fitting follows the Chinchilla refits: minimise the Huber loss (delta 1e-3) of
``log L_pred - log L_obs`` over the log-sum-exp parameterisation, with L-BFGS from a grid of
starts, keep the best; bootstrap (resampling runs) for intervals; error on held-out runs.

A table with a single ``E`` per family cannot identify the ``E`` terms: :func:`fit_family` then fits
the Chinchilla form ``a N^alpha + b D^beta + c`` (``E`` folded into ``a``, ``b``) and the law records
the ``E`` it is valid for.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mobilemoe.errors import MobileMoEError
from mobilemoe.utils import read_yaml

PARAM_NAMES = ("a", "alpha", "b", "beta", "c", "delta", "gamma", "omega", "zeta")
E_TERMS = ("delta", "gamma", "omega", "zeta")
LAW_KIND = "mobilemoe-scaling-law"
DEFAULT_LAW_FILE = Path(__file__).with_name("default_law.yaml")


class LawError(MobileMoEError, ValueError):
    """A run table or law file is malformed, or a fit cannot be made (the message says which)."""


# ---------------------------------------------------------------------- the law
@dataclass
class LawParams:
    a: float
    alpha: float
    b: float
    beta: float
    c: float
    delta: float = 0.0
    gamma: float = 0.0
    omega: float = 0.0
    zeta: float = 0.0
    e_fixed: float | None = None  # set by a single-E (Chinchilla-form) fit: only valid at this E

    def predict(self, n_act: Any, tokens: Any, e: Any = 1.0) -> np.ndarray:
        n = np.asarray(n_act, dtype=np.float64)
        d = np.asarray(tokens, dtype=np.float64)
        le = np.log(np.asarray(e, dtype=np.float64))
        if self.e_fixed is not None:
            le = np.zeros_like(le)  # E already folded into a, b
        n_term = self.a * np.exp(self.delta * le + (self.alpha + self.gamma * le) * np.log(n))
        d_term = self.b * np.exp(self.omega * le + (self.beta + self.zeta * le) * np.log(d))
        return n_term + d_term + self.c

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["e_fixed"] is None:
            del out["e_fixed"]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "params") -> "LawParams":
        if not isinstance(data, dict):
            raise LawError(f"field '{where}': expected a mapping of law constants, got {data!r}")
        unknown = [k for k in data if k not in PARAM_NAMES + ("e_fixed",)]
        if unknown:
            raise LawError(f"field '{where}.{unknown[0]}': unknown law constant (known: {', '.join(PARAM_NAMES)}, e_fixed)")
        values = {}
        for name in PARAM_NAMES + ("e_fixed",):
            if name not in data:
                if name in ("a", "alpha", "b", "beta", "c"):
                    raise LawError(f"field '{where}.{name}': missing")
                continue
            v = data[name]
            if name == "e_fixed" and v is None:
                continue
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise LawError(f"field '{where}.{name}': expected a number, got {v!r}")
            values[name] = float(v)
        for name in ("a", "b"):
            if values[name] <= 0:
                raise LawError(f"field '{where}.{name}': expected > 0, got {values[name]}")
        if values["c"] < 0:
            raise LawError(f"field '{where}.c': expected >= 0, got {values['c']}")
        return cls(**values)


@dataclass
class Law:
    """A set of fitted laws: one per family key (``k1-g8-s4``), ``*`` for any other family.

    ``a_scale`` optionally multiplies ``a`` by granularity / shared-expert setting (used by the
    shipped default constants to encode the fine-grained and shared-expert gains, which the
    joint law has no variable for; a fitted per-family law does not need it).
    """

    families: dict[str, LawParams]
    is_default: bool = False
    source: str = ""
    note: str = ""
    a_scale_granularity: dict[int, float] = field(default_factory=dict)
    a_scale_shared: dict[str, float] = field(default_factory=dict)  # "none" | "shared"
    meta: dict[str, Any] = field(default_factory=dict)

    def params_for(self, family_key: str, g: int = 1, s: int = 0) -> LawParams | None:
        p = self.families.get(family_key) or self.families.get("*")
        if p is None:
            return None
        if family_key not in self.families and (self.a_scale_granularity or self.a_scale_shared):
            scale = self._g_scale(g) * self.a_scale_shared.get("shared" if s else "none", 1.0)
            p = LawParams(**{**p.to_dict(), "a": p.a * scale})
        return p

    def _g_scale(self, g: int) -> float:
        if not self.a_scale_granularity:
            return 1.0
        if g in self.a_scale_granularity:
            return self.a_scale_granularity[g]
        keys = sorted(self.a_scale_granularity)  # log-linear interpolation, clamped
        if g <= keys[0]:
            return self.a_scale_granularity[keys[0]]
        if g >= keys[-1]:
            return self.a_scale_granularity[keys[-1]]
        for lo, hi in zip(keys, keys[1:]):
            if lo <= g <= hi:
                t = (math.log(g) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return (1 - t) * self.a_scale_granularity[lo] + t * self.a_scale_granularity[hi]
        return 1.0

    def predict(self, n_act: float, tokens: float, e: float, family_key: str, g: int = 1, s: int = 0) -> float | None:
        p = self.params_for(family_key, g, s)
        if p is None:
            return None
        if p.e_fixed is not None and abs(p.e_fixed - e) > 1e-9:
            return None  # a single-E fit says nothing about other E
        return float(p.predict(n_act, tokens, e))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": LAW_KIND, "default": self.is_default, "note": self.note,
                               "families": {k: v.to_dict() for k, v in self.families.items()}}
        if self.a_scale_granularity:
            out["a_scale_granularity"] = {int(k): float(v) for k, v in self.a_scale_granularity.items()}
        if self.a_scale_shared:
            out["a_scale_shared"] = dict(self.a_scale_shared)
        if self.meta:
            out["meta"] = self.meta
        return out

    def save(self, path: str | os.PathLike) -> None:
        from mobilemoe.utils import atomic_write_text

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)
        else:
            text = json.dumps(_plain(self.to_dict()), indent=2) + "\n"
        atomic_write_text(path, text)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def law_from_dict(data: Any, source: str = "law") -> Law:
    if not isinstance(data, dict):
        raise LawError(f"{source}: expected a mapping at the top level")
    if data.get("kind", LAW_KIND) != LAW_KIND:
        raise LawError(f"{source}: field 'kind': expected {LAW_KIND!r}, got {data.get('kind')!r}")
    fams = data.get("families")
    if not isinstance(fams, dict) or not fams:
        raise LawError(f"{source}: field 'families': expected a non-empty mapping of family -> constants")
    families = {str(k): LawParams.from_dict(v, f"families.{k}") for k, v in fams.items()}
    try:
        g_scale = {int(k): float(v) for k, v in (data.get("a_scale_granularity") or {}).items()}
        s_scale = {str(k): float(v) for k, v in (data.get("a_scale_shared") or {}).items()}
    except (TypeError, ValueError) as exc:
        raise LawError(f"{source}: field 'a_scale_granularity'/'a_scale_shared': expected numbers ({exc})") from None
    return Law(families=families, is_default=bool(data.get("default", False)), source=source,
               note=str(data.get("note", "")), a_scale_granularity=g_scale, a_scale_shared=s_scale,
               meta=dict(data.get("meta") or {}))


def load_law(path: str | os.PathLike | None = None) -> Law:
    """Read a law file (YAML or JSON); ``None`` reads the shipped default constants."""
    path = Path(path) if path is not None else DEFAULT_LAW_FILE
    data = read_yaml(path, LawError, "law", syntax="YAML/JSON")
    return law_from_dict(data, source=str(path))


def default_law() -> Law:
    law = load_law(None)
    law.is_default = True
    return law


# ---------------------------------------------------------------------- run tables
@dataclass
class Run:
    """One training run: what the law needs (``n_act``, ``tokens``, ``e``, ``loss``) and its family."""

    n_act: float
    tokens: float
    e: float
    loss: float
    family: str = "*"
    info: dict[str, Any] = field(default_factory=dict)


_ARCH_FIELDS = ("d_model", "layers", "E", "g", "k", "s", "vocab", "ffn_ratio", "head_dim", "kv_heads", "heads")


def run_from_record(rec: dict[str, Any], where: str = "run") -> Run:
    """A table row -> :class:`Run`. A row gives ``loss`` and ``tokens`` plus either the law inputs
    (``n_act``, ``e``, optional ``family``) or architecture fields (``d_model``, ``layers``, ``E``,
    ``g``, ``k``, ``s``, ...) or a ``config`` mapping, from which the accounting is computed."""
    from mobilemoe.scaling.space import Arch, SpaceError, arch_from_config, stats

    def num(name: str) -> float:
        if name not in rec:
            raise LawError(f"{where}: field '{name}': missing")
        v = rec[name]
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise LawError(f"{where}: field '{name}': expected a number, got {rec[name]!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise LawError(f"{where}: field '{name}': expected a positive finite number, got {rec[name]!r}")
        return v

    loss, tokens = num("loss"), num("tokens")
    if "n_act" in rec:
        e = num("e") if "e" in rec else 1.0
        return Run(num("n_act"), tokens, e, loss, str(rec.get("family", "*")), dict(rec))
    try:
        if isinstance(rec.get("config"), dict):
            from mobilemoe.config import MobileMoEConfig

            arch = arch_from_config(MobileMoEConfig.from_dict(rec["config"], source=f"{where}.config"))
        elif "d_model" in rec:
            kwargs = {}
            for k in _ARCH_FIELDS:
                if k in rec and rec[k] not in (None, ""):
                    kwargs[k] = int(float(rec[k]))
            arch = Arch(**kwargs)
        else:
            raise LawError(f"{where}: needs 'n_act' (+ 'e'), architecture fields (d_model, layers, E, g, k, s) "
                           "or a 'config' mapping")
        st = stats(arch)
    except (SpaceError, TypeError, ValueError) as exc:
        if isinstance(exc, LawError):
            raise
        raise LawError(f"{where}: {exc}") from None
    return Run(st.active_params, tokens, arch.e_law, loss,
               "dense" if arch.is_dense else arch.family.key(), dict(rec))


def read_runs(path: str | os.PathLike) -> list[Run]:
    """Read a run table: ``.jsonl`` (one object a line) or ``.csv`` (header row). Rows without a
    ``loss`` (unfinished, or a ``status`` other than ``done``) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LawError(f"{path}: no such run table")
    records: list[tuple[str, dict[str, Any]]] = []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                records.append((f"{path}:{i + 2}", {k: v for k, v in row.items() if v not in (None, "")}))
    else:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{i + 1}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise LawError(f"{path}:{i + 1}: not valid JSON: {exc}") from None
    runs = []
    for where, rec in records:
        if rec.get("status", "done") != "done" or rec.get("loss") in (None, ""):
            continue
        runs.append(run_from_record(rec, where))
    if not runs:
        raise LawError(f"{path}: no finished runs (rows with a 'loss')")
    return runs


# ---------------------------------------------------------------------- fitting
@dataclass
class FitResult:
    params: LawParams
    objective: float
    n_runs: int
    family: str
    joint: bool  # E terms fitted (several E) or Chinchilla form at one E
    rmse_log: float  # in-sample RMSE of log loss
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap percentile CIs
    heldout: dict[str, float] = field(default_factory=dict)
    n_points: int = 0  # distinct design points (runs of several seeds at one point count once)
    samples: list[LawParams] = field(default_factory=list, repr=False)  # the bootstrap fits

    def predict_interval(self, n_act: float, tokens: float, e: float = 1.0, ci: float = 0.9
                         ) -> tuple[float, float, float]:
        """The fit's loss prediction and the bootstrap percentile interval ``ci`` around it
        (``(pred, nan, nan)`` when the fit ran without bootstrap)."""
        pred = float(self.params.predict(n_act, tokens, e))
        if not self.samples:
            return pred, float("nan"), float("nan")
        xs = [float(p.predict(n_act, tokens, e)) for p in self.samples]
        return pred, float(np.percentile(xs, 100 * (1 - ci) / 2)), float(np.percentile(xs, 100 * (1 + ci) / 2))

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "joint": self.joint, "n_runs": self.n_runs, "n_points": self.n_points,
                "bootstrap_fits": len(self.samples), "objective": self.objective,
                "rmse_log": self.rmse_log, "params": self.params.to_dict(),
                "intervals": {k: list(v) for k, v in self.intervals.items()}, "heldout": self.heldout}


def _huber(r, delta: float):
    import torch

    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _theta_to_params(theta: Sequence[float], joint: bool, e_fixed: float | None,
                     center: tuple[float, float] = (0.0, 0.0)) -> LawParams:
    """Centred fit coordinates -> the law's constants.

    The fit works in ``x = ln N - mN``, ``y = ln D - mD`` (the data's mean logs), which keeps L-BFGS
    well conditioned: ``t1 = A + D' ln E + (alpha + gamma ln E) x`` gives ``ln a = A - alpha mN`` and
    ``delta = D' - gamma mN`` (likewise for the data term).
    """
    mn, md = center
    A, alpha, B, beta, lc = theta[:5]
    dp, gamma, op, zeta = theta[5:9] if joint else (0.0, 0.0, 0.0, 0.0)
    extra = dict(delta=dp - gamma * mn, gamma=gamma, omega=op - zeta * md, zeta=zeta) if joint else {}
    return LawParams(a=math.exp(A - alpha * mn), alpha=alpha, b=math.exp(B - beta * md), beta=beta,
                     c=math.exp(lc), e_fixed=None if joint else e_fixed, **extra)


def _params_or_none(theta: Sequence[float] | None, joint: bool, e_fixed: float | None,
                    center: tuple[float, float]) -> LawParams | None:
    """:func:`_theta_to_params`, or None for a failed fit or one whose constants overflow a float
    (a resample that ran off to an absurd exponent carries no information)."""
    if theta is None:
        return None
    try:
        return _theta_to_params(theta, joint, e_fixed, center)
    except OverflowError:
        return None


def _params_to_theta(p: LawParams, joint: bool, center: tuple[float, float]) -> list[float]:
    mn, md = center
    theta = [math.log(p.a) + p.alpha * mn, p.alpha, math.log(p.b) + p.beta * md, p.beta, math.log(max(p.c, 1e-12))]
    if joint:
        theta += [p.delta + p.gamma * mn, p.gamma, p.omega + p.zeta * md, p.zeta]
    return theta


def _init_grid(joint: bool, n_starts: int, rng: random.Random) -> list[list[float]]:
    """Start grid in centred coordinates (A, alpha, B, beta, log c [, D', gamma, O', zeta]):
    each term's size at the data's centre from 0.05 to 2 nats, exponents -0.6..-0.1 (Chinchilla-style)."""
    grid = []
    for A in (-3.0, -1.5, 0.0, 0.7):
        for alpha in (-0.6, -0.3, -0.1):
            for B in (-3.0, -1.5, 0.0, 0.7):
                for beta in (-0.6, -0.3, -0.1):
                    for lc in (-0.5, 0.3, 1.0):
                        grid.append([A, alpha, B, beta, lc])
    rng.shuffle(grid)
    grid = grid[:n_starts]
    if joint:
        grid = [g + [rng.uniform(-0.2, 0.05), rng.uniform(-0.02, 0.02), rng.uniform(-0.1, 0.1),
                     rng.uniform(-0.02, 0.02)] for g in grid]
    return grid


def _fit_once(x, y, ln_e, ln_l, w, theta0, joint: bool, huber_delta: float, max_iter: int):
    import torch

    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    scale = 1.0 / (huber_delta * float(w.sum()))  # O(1) objective: tolerances mean something

    def objective():
        A, alpha, B, beta, lc = theta[0], theta[1], theta[2], theta[3], theta[4]
        if joint:
            dp, gamma, op, zeta = theta[5], theta[6], theta[7], theta[8]
            t1 = A + dp * ln_e + (alpha + gamma * ln_e) * x
            t2 = B + op * ln_e + (beta + zeta * ln_e) * y
        else:
            t1 = A + alpha * x
            t2 = B + beta * y
        pred = torch.logsumexp(torch.stack([t1, t2, lc.expand_as(t1)]), dim=0)
        return scale * (w * _huber(pred - ln_l, huber_delta)).sum()

    best = float("inf")
    for _ in range(4):  # L-BFGS restarts from its own end point until it stops improving
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15, history_size=20)

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except RuntimeError:
            return None, float("inf")
        with torch.no_grad():
            val = float(objective())
        if not math.isfinite(val) or not bool(torch.isfinite(theta).all()):
            return None, float("inf")
        if val > best - 1e-9 * max(1.0, abs(best)):
            best = min(best, val)
            break
        best = val
    return theta.detach().tolist(), best * huber_delta * float(w.sum())


def _tensors(runs: Sequence[Run]):
    import torch

    f = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    ln_n = f([math.log(r.n_act) for r in runs])
    ln_d = f([math.log(r.tokens) for r in runs])
    center = (float(ln_n.mean()), float(ln_d.mean()))
    return (ln_n - center[0], ln_d - center[1], f([math.log(r.e) for r in runs]),
            f([math.log(r.loss) for r in runs]), center)


def _fit(runs: Sequence[Run], joint: bool, starts: list[list[float]], huber_delta: float, max_iter: int,
         weights=None, center: tuple[float, float] | None = None):
    """Best fit over ``starts`` (centred coordinates about ``center``, default the data's own)."""
    import torch

    x, y, ln_e, ln_l, own = _tensors(runs)
    if center is not None:  # shift to the caller's centre so its starts mean the same
        x, y = x + own[0] - center[0], y + own[1] - center[1]
    else:
        center = own
    w = torch.ones_like(x) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    best, best_val = None, float("inf")
    for theta0 in starts:
        theta, val = _fit_once(x, y, ln_e, ln_l, w, theta0, joint, huber_delta, max_iter)
        if theta is not None and val < best_val:
            best, best_val = theta, val
    return best, best_val, center


def log_rmse(params: LawParams, runs: Sequence[Run]) -> float:
    pred = params.predict([r.n_act for r in runs], [r.tokens for r in runs], [r.e for r in runs])
    obs = np.array([r.loss for r in runs])
    return float(np.sqrt(np.mean((np.log(pred) - np.log(obs)) ** 2)))


def heldout_error(params: LawParams, runs: Sequence[Run]) -> dict[str, float]:
    pred = params.predict([r.n_act for r in runs], [r.tokens for r in runs], [r.e for r in runs])
    obs = np.array([r.loss for r in runs])
    return {"n": len(runs), "rmse_log": float(np.sqrt(np.mean((np.log(pred) - np.log(obs)) ** 2))),
            "mape": float(np.mean(np.abs(pred - obs) / obs)), "max_abs_err": float(np.max(np.abs(pred - obs)))}


def point_clusters(runs: Sequence[Run]) -> list[list[int]]:
    """Indices of ``runs`` grouped by design point, in order of first appearance.

    A point is the run's ``info['point']`` (the sweep's architecture + tokens key, shared by its
    seeds), else its law inputs ``(family, n_act, tokens, e)``. A table without repeated seeds has
    one run per cluster, so everything below reduces to the per-run behaviour.
    """
    ids: dict[Any, int] = {}
    clusters: list[list[int]] = []
    for i, r in enumerate(runs):
        pt = r.info.get("point") if r.info else None
        key = ("point", str(pt)) if pt else ("law", r.family, round(r.n_act, 6), round(r.tokens, 6), round(r.e, 9))
        if key not in ids:
            ids[key] = len(clusters)
            clusters.append([])
        clusters[ids[key]].append(i)
    return clusters


def _cluster_weights(clusters: list[list[int]], n_runs: int, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample as integer run weights: clusters drawn with replacement, each drawn
    cluster contributing all of its runs (seeds) once per draw.

    Why resample points, not runs: the seeds of one point share its (N, D, E) and any misfit of the
    law's form there; they are repeated measurements of one design point, not independent design
    points. Resampling runs independently would treat 3 seeds as 3 points (pseudo-replication) and
    give intervals too narrow by about sqrt(seeds) wherever the form's misfit dominates the seed
    noise. Drawing whole points keeps each point's seed spread inside every resample, so the
    interval reflects both the seed noise and the design (the cluster bootstrap)."""
    m = len(clusters)
    picks = np.bincount(rng.integers(0, m, m), minlength=m)
    w = np.zeros(n_runs, dtype=np.float64)
    for c, members in enumerate(clusters):
        w[members] = picks[c]
    return w


def fit_law(runs: Sequence[Run], joint: bool | None = None, n_starts: int = 24, huber_delta: float = 1e-3,
            bootstrap: int = 0, holdout: float = 0.0, seed: int = 0, max_iter: int = 200,
            family: str = "*", ci: float = 0.9, holdout_mode: str = "random") -> FitResult:
    """Fit the law to ``runs``.

    ``joint`` None: the joint law when the runs span at least 2 distinct ``E`` (and there are enough
    runs for 9 constants), else the Chinchilla form at the single ``E``. ``bootstrap`` resamples
    give percentile intervals (``ci``); ``holdout`` (a fraction) fits on the rest and reports the
    error on the held-out runs (the returned constants are then refitted on all runs);
    ``holdout_mode`` ``random`` or ``largest`` (hold out the runs with the most compute, 6 N D: an
    extrapolation test, the question a scaling law is asked).

    Several seeds per point: every seed's run is a data point of the fit (the Huber objective then
    averages the seed noise at each point); the bootstrap and the hold-out work on whole points
    (:func:`point_clusters`, :func:`_cluster_weights`), so a held-out point never has a seed in the
    training set and intervals are not narrowed by counting seeds as design points.
    """
    runs = list(runs)
    es = sorted({round(r.e, 9) for r in runs})
    if joint is None:
        joint = len(es) >= 2
    n_free = 9 if joint else 5
    if len(runs) < n_free + 1:
        raise LawError(f"family {family}: {len(runs)} runs cannot fit {n_free} constants; need at least {n_free + 1}"
                       + (" (or fit one E at a time)" if joint else ""))
    clusters = point_clusters(runs)
    if len(clusters) < n_free + 1:
        raise LawError(f"family {family}: {len(clusters)} distinct points ({len(runs)} runs) cannot fit {n_free} "
                       f"constants; need at least {n_free + 1} points (more seeds do not add points)")
    if joint and len(es) < 2:
        raise LawError(f"family {family}: the joint law needs runs at 2+ expert counts E; all runs have E={es[0]}")
    if not joint and len(es) > 1:
        raise LawError(f"family {family}: the single-E fit got several E {es}; use joint=True")
    rng = random.Random(seed)
    starts = _init_grid(joint, n_starts, rng)
    e_fixed = es[0] if not joint else None

    heldout: dict[str, float] = {}
    if holdout_mode not in ("random", "largest"):
        raise LawError(f"holdout_mode: expected 'random' or 'largest', got {holdout_mode!r}")
    if holdout > 0:
        order = list(range(len(clusters)))  # hold out whole points: no seed of a test point is trained on
        if holdout_mode == "largest":
            order.sort(key=lambda c: -max(runs[i].n_act * runs[i].tokens for i in clusters[c]))
        else:
            rng.shuffle(order)
        n_test = max(1, int(round(holdout * len(clusters))))
        test = [runs[i] for c in order[:n_test] for i in clusters[c]]
        train = [runs[i] for c in order[n_test:] for i in clusters[c]]
        if len(order) - n_test < n_free + 1:
            raise LawError(f"family {family}: too few runs left to fit after holding out {n_test}")
        th, _, c_train = _fit(train, joint, starts, huber_delta, max_iter)
        held_params = _params_or_none(th, joint, e_fixed, c_train)  # None: no held-out figure, not a wrong one
        if held_params is not None:
            heldout = heldout_error(held_params, test)
            heldout["mode"] = holdout_mode  # type: ignore[assignment]

    theta, val, center = _fit(runs, joint, starts, huber_delta, max_iter)
    if theta is None:
        raise LawError(f"family {family}: the fit diverged from every start; check the run table")
    params = _params_or_none(theta, joint, e_fixed, center)
    if params is None:
        raise LawError(f"family {family}: the best fit has constants out of floating-point range "
                       "(too few or too noisy runs for this form)")

    intervals: dict[str, tuple[float, float]] = {}
    boot: list[LawParams] = []
    if bootstrap > 0:
        samples: dict[str, list[float]] = {k: [] for k in PARAM_NAMES}
        np_rng = np.random.default_rng(seed)
        for _ in range(bootstrap):
            counts = _cluster_weights(clusters, len(runs), np_rng)  # resample points = integer run weights
            th, _, _ = _fit(runs, joint, [theta], huber_delta, max_iter, weights=counts, center=center)
            p = _params_or_none(th, joint, e_fixed, center)
            if p is None:
                continue
            boot.append(p)
            for k in PARAM_NAMES:
                samples[k].append(getattr(p, k))
        lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
        for k, xs in samples.items():
            if xs and (joint or k not in E_TERMS):
                intervals[k] = (float(np.percentile(xs, lo_q)), float(np.percentile(xs, hi_q)))
    return FitResult(params=params, objective=val, n_runs=len(runs), family=family, joint=joint,
                     rmse_log=log_rmse(params, runs), intervals=intervals, heldout=heldout, n_points=len(clusters),
                     samples=boot)


def fit_family(runs: Sequence[Run], **kwargs: Any) -> FitResult:
    """The simpler per-family fit: one ``E``, Chinchilla form (``E`` folded into a, b)."""
    return fit_law(runs, joint=False, **kwargs)


def fit_table(runs: Sequence[Run], include_dense: bool = True, pooled: bool = True,
              **kwargs: Any) -> tuple[Law, list[FitResult]]:
    """Fit one law per family of the table (dense runs join every MoE family as its E=1 anchor),
    plus a pooled ``*`` law over all runs when possible. Families with too few runs are skipped
    (reported in ``Law.meta['skipped']``)."""
    runs = list(runs)
    dense = [r for r in runs if r.family == "dense"]
    fams = sorted({r.family for r in runs if r.family != "dense"})
    results: list[FitResult] = []
    skipped: dict[str, str] = {}
    groups: list[tuple[str, list[Run]]] = []
    for fam in fams:
        members = [r for r in runs if r.family == fam]
        es = {round(r.e, 9) for r in members}
        if include_dense and dense and len(es) >= 1:
            members = members + dense
        groups.append((fam, members))
    if dense:
        groups.append(("dense", dense))
    if pooled and len(fams) > 1:
        groups.append(("*", runs))
    for fam, members in groups:
        try:
            results.append(fit_law(members, family=fam, **kwargs))
        except LawError as exc:
            skipped[fam] = str(exc)
    if not results:
        raise LawError("no family could be fitted: " + "; ".join(skipped.values()))
    law = Law(families={r.family: r.params for r in results}, is_default=False,
              note="fitted with mobilemoe.scaling.law.fit_table",
              meta={"fits": [r.to_dict() for r in results], "skipped": skipped})
    return law, results


def synthetic_runs(params: LawParams, n_act: Iterable[float], tokens: Iterable[float], es: Iterable[float],
                   noise: float = 0.0, seed: int = 0, family: str = "*") -> list[Run]:
    """Runs drawn from the law with multiplicative log-normal noise (for tests and demos)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in n_act:
        for d in tokens:
            for e in es:
                loss = float(params.predict(n, d, e)) * float(np.exp(rng.normal(0.0, noise)))
                out.append(Run(float(n), float(d), float(e), loss, family))
    return out
