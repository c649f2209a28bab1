"""Sweep driver: train a grid of small models, one row per finished run in a JSONL run table.

The driver is built around one callable, ``train_one(config, tokens, out_dir) -> final_val_loss``
(:data:`TrainOne`); :func:`recipe_train_one` wires it to the project's trainer
(:func:`mobilemoe.train.run.run_recipe`), and tests pass a fake.

Resumable: the run table (``runs.jsonl``) is rewritten atomically (temp file + rename) after every
run, so a crash never leaves a half-written row; on restart, every run whose key already has a
``status: done`` row is skipped. A failed run is recorded as ``status: failed`` (with the error)
and retried on the next start.

Workers: several sweep processes may share one table and output root (e.g. one per core, each
pinned with ``taskset``). A run is claimed by the trainer's lock on its own directory, so a second
worker that reaches a run being trained elsewhere skips it (not a failure); appends to the table hold
a lock on ``<table>.lock`` around the read-rename, so no worker's row is lost.

Seeds: ``seed=0,1,2`` is a grid axis. One (point, seed) is one run: its key is the point's key plus
``-S<seed>`` (seed 0 keeps the bare point key, so tables written before seeds existed resume as
seed 0), and its row keeps ``seed`` and ``point`` (the key without the seed). :func:`recipe_train_one`
adds the seed to the recipe's seed, which moves both the model's initialisation and the data order.
:func:`summarize` groups a table's runs by point: mean +- standard error over seeds.

Grid syntax (``--grid``): ``;``- or space-separated ``name=v1,v2,...`` lists over the
:class:`~mobilemoe.scaling.space.Arch` fields (``d_model``, ``layers``, ``E``, ``g``, ``k``, ``s``,
``vocab``, ``ffn_ratio``, ``head_dim``, ``kv_heads``, ``heads``), ``tokens`` and ``seed``; ``layers=rule``
uses the tiers' depth rule; ``s=half`` isolates half of the active slots into a shared expert.
Example: ``d_model=128,192 layers=4 E=1,4,8 g=1,4 k=1 s=0,half tokens=2e6,4e6 seed=0,1,2``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.scaling.space import Arch, SpaceError, rule_layers, stats

TrainOne = Callable[[MobileMoEConfig, int, Path, int], float]  # (config, tokens, out_dir, seed) -> val loss
GRID_INT_FIELDS = ("d_model", "layers", "E", "g", "k", "vocab", "ffn_ratio", "head_dim", "kv_heads", "heads")


class SweepError(MobileMoEError, ValueError):
    """A grid spec or run table is malformed (the message names the field or line)."""


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid: an architecture, a token budget and a seed."""

    arch: Arch
    tokens: int
    seed: int = 0

    @property
    def point_key(self) -> str:
        """The (architecture, tokens) key, shared by every seed of the point."""
        a = self.arch
        return (f"d{a.d_model}-L{a.layers}-E{a.E}-g{a.g}-k{a.k}-s{a.s}-v{a.vocab}-f{a.ffn_ratio}"
                f"-h{a.n_heads}x{a.head_dim}kv{a.kv_heads}-T{self.tokens}")

    @property
    def key(self) -> str:
        """The run's key: seed 0 is the bare point key, so pre-seed tables resume unchanged."""
        return self.point_key if self.seed == 0 else f"{self.point_key}-S{self.seed}"


def parse_grid(text: str, defaults: dict[str, Any] | None = None) -> list[SweepPoint]:
    """A grid spec -> the valid points of its Cartesian product (invalid combinations, e.g. ``E < k``
    or an expert width that is not a whole number, are dropped)."""
    values: dict[str, list[Any]] = {}
    for item in text.replace(";", " ").split():
        if "=" not in item:
            raise SweepError(f"grid item {item!r}: expected name=v1,v2,...")
        name, raw = item.split("=", 1)
        name = name.strip()
        known = GRID_INT_FIELDS + ("s", "tokens", "seed")
        if name not in known:
            raise SweepError(f"grid field '{name}': unknown (known: {', '.join(known)})")
        parsed: list[Any] = []
        for v in raw.split(","):
            v = v.strip()
            if not v:
                continue
            if (name == "layers" and v == "rule") or (name == "s" and v == "half"):
                parsed.append(v)
                continue
            try:
                f = float(v)
            except ValueError:
                raise SweepError(f"grid field '{name}': expected numbers, got {v!r}") from None
            if f != int(f) or f < 0 or (f == 0 and name not in ("s", "seed")):
                kind = "non-negative" if name in ("s", "seed") else "positive"
                raise SweepError(f"grid field '{name}': expected {kind} integers, got {v!r}")
            parsed.append(int(f))
        if not parsed:
            raise SweepError(f"grid field '{name}': no values")
        values[name] = parsed
    base = dict(defaults or {})
    for req in ("d_model", "tokens"):
        if req not in values and req not in base:
            raise SweepError(f"grid field '{req}': missing (e.g. '{req}=128,192')")
    names = list(values)
    points: list[SweepPoint] = []
    for combo in itertools.product(*(values[n] for n in names)):
        kw = dict(base)
        kw.update(zip(names, combo))
        tokens = int(kw.pop("tokens"))
        seed = int(kw.pop("seed", 0))
        kw.setdefault("layers", "rule")
        if kw["layers"] == "rule":
            kw["layers"] = rule_layers(kw["d_model"])
        k, g = kw.get("k", 1), kw.get("g", 1)
        if kw.get("s") == "half":
            kw["s"] = (k * g) // 2
        arch = Arch(**{n: v for n, v in kw.items() if n in GRID_INT_FIELDS + ("s", "tie_embeddings")})
        if arch.is_dense:
            arch = Arch(**{**arch.to_dict(), "g": 1, "s": 0})  # dense ignores g and s
        try:
            arch.check()
            arch.to_config()
        except (SpaceError, MobileMoEError):
            continue
        points.append(SweepPoint(arch, tokens, seed))
    return list(dict.fromkeys(points))


class RunTable:
    """The JSONL run table. Rows are keyed by :attr:`SweepPoint.key`; the last row of a key wins."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SweepError(f"{self.path}:{i + 1}: not valid JSON ({exc}); fix or remove that line") from None
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.rows() if "key" in r}

    def done(self) -> set[str]:
        return {k for k, r in self.latest().items() if r.get("status") == "done"}

    def append(self, row: dict[str, Any]) -> None:
        """Add one row atomically: the whole table is rewritten to a temp file and renamed over,
        under an exclusive lock so that workers sharing the table never drop each other's rows."""
        import fcntl

        from mobilemoe.utils import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: an append takes milliseconds
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            if text and not text.endswith("\n"):
                text += "\n"
            atomic_write_text(self.path, text + json.dumps(row, sort_keys=False) + "\n")
        finally:
            os.close(fd)


def run_record(point: SweepPoint, **fields: Any) -> dict[str, Any]:
    st = stats(point.arch)
    a = point.arch
    row = {"key": point.key, "point": point.point_key, "seed": point.seed, **{k: getattr(a, k) for k in ("d_model", "layers", "E", "g", "k", "s", "vocab",
                                                              "ffn_ratio", "head_dim", "kv_heads")},
           "heads": a.n_heads, "tokens": point.tokens, "n_act": st.active_params, "e": a.e_law,
           "family": "dense" if a.is_dense else a.family.key(), "total_params": st.total_params,
           "int4_bytes": st.int4_bytes, "label": a.label()}
    row.update(fields)
    return row


def run_sweep(points: Iterable[SweepPoint], train_one: TrainOne, table: str | os.PathLike,
              out_root: str | os.PathLike, log: Callable[[str], None] | None = print,
              stop_on_error: bool = False) -> dict[str, Any]:
    """Train every (point, seed) not yet done; returns counts ``{"done", "skipped", "busy", "failed"}``.

    ``train_one(config, tokens, out_dir, seed)`` trains one run; each run has its own directory
    ``out_root / key``. A run whose directory another worker holds (:class:`~mobilemoe.utils.OutputLocked`)
    counts as ``busy`` and is left to that worker."""
    from mobilemoe.utils import OutputLocked

    table_ = RunTable(table)
    out_root = Path(out_root)
    counts = {"done": 0, "skipped": 0, "busy": 0, "failed": 0}
    points = list(points)
    for i, p in enumerate(points, 1):
        if p.key in table_.done():  # re-read per run: another worker may have finished it meanwhile
            counts["skipped"] += 1
            if log:
                log(f"[{i}/{len(points)}] {p.key}: done already, skipped")
            continue
        if log:
            log(f"[{i}/{len(points)}] {p.key}: training {p.arch.label()} on {p.tokens:.3g} tokens, seed {p.seed}")
        t0 = time.perf_counter()
        try:
            loss = float(train_one(p.arch.to_config(), p.tokens, out_root / p.key, p.seed))
            if not math.isfinite(loss):
                raise SweepError(f"train_one returned a non-finite loss {loss}")
        except KeyboardInterrupt:
            raise
        except OutputLocked as exc:
            counts["busy"] += 1
            if log:
                log(f"    busy: {exc}; left to that worker")
            continue
        except Exception as exc:  # noqa: BLE001 - recorded, retried on the next start
            table_.append(run_record(p, status="failed", error=f"{type(exc).__name__}: {exc}",
                                     seconds=time.perf_counter() - t0, time=time.time()))
            counts["failed"] += 1
            if log:
                log(f"    failed: {type(exc).__name__}: {exc}")
            if stop_on_error:
                raise
            continue
        table_.append(run_record(p, status="done", loss=loss, seconds=time.perf_counter() - t0, time=time.time()))
        counts["done"] += 1
        if log:
            log(f"    val loss {loss:.4f} ({time.perf_counter() - t0:.1f} s)")
    return counts


def _point_of(row: dict[str, Any]) -> str:
    """A row's point key: its ``point`` field, else (rows written before seeds) its key minus ``-S<n>``."""
    if row.get("point"):
        return str(row["point"])
    key = str(row.get("key", ""))
    head, sep, tail = key.rpartition("-S")
    return head if sep and tail.isdigit() else key


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished runs grouped by point (architecture + tokens) over seeds.

    Each group: ``point``, ``n`` (runs), ``seeds``, ``mean`` loss, ``std`` (sample, ddof 1) and
    ``se`` = std / sqrt(n) (None when n = 1: one seed says nothing about the seed spread), plus the
    first row's descriptive fields (label, family, tokens, n_act, int4_bytes). Only the latest
    ``done`` row of each key counts, so a re-run replaces, never double-counts, a seed.
    """
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "key" in r:
            latest[r["key"]] = r
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in latest.values():
        if r.get("status", "done") == "done" and isinstance(r.get("loss"), (int, float)):
            groups.setdefault(_point_of(r), []).append(r)
    out = []
    for point, rs in groups.items():
        losses = [float(r["loss"]) for r in rs]
        n = len(losses)
        mean = sum(losses) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1)) if n > 1 else None
        first = rs[0]
        out.append({"point": point, **{k: first.get(k) for k in ("label", "family", "d_model", "tokens", "n_act", "e",
                                                                  "int4_bytes")},
                    "n": n, "seeds": sorted(int(r.get("seed", 0)) for r in rs), "mean": mean, "std": std,
                    "se": std / math.sqrt(n) if std is not None else None})
    return sorted(out, key=lambda g: (str(g["family"]), g["n_act"] or 0, g["tokens"] or 0, g["point"]))


def format_summary(groups: list[dict[str, Any]]) -> str:
    """The :func:`summarize` groups as a Markdown table (loss mean +- standard error, n)."""
    lines = ["| model | family | tokens | active params | INT4 MB | val loss (mean +- SE) | n | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        se = f" +- {g['se']:.4f}" if g["se"] is not None else " (1 seed)"
        lines.append(f"| {g['label']} | {g['family']} | {float(g['tokens'] or 0):.3g} | "
                     f"{float(g['n_act'] or 0) / 1e6:.2f}M | {float(g['int4_bytes'] or 0) / 1e6:.2f} | "
                     f"{g['mean']:.4f}{se} | {g['n']} | {','.join(map(str, g['seeds']))} |")
    return "\n".join(lines)


def recipe_train_one(recipe_path: str | os.PathLike, stage: str | None = None, progress: bool = False) -> TrainOne:
    """A ``train_one`` that trains with the project's trainer: the recipe's data, tokenizer and
    optimiser settings (its first stage, or ``stage``), the sweep point's model config, and a
    token budget of ``tokens`` (``max_steps = ceil(tokens / tokens_per_step)``). The run's ``seed``
    is added to the recipe's seed, which the trainer uses for both the initialisation
    (``init_seed + seed``) and the data order, so seeds differ in both."""
    import copy
    import dataclasses

    from mobilemoe.train.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    base_stage = recipe.stage(stage) if stage else recipe.stages[0]

    def train_one(cfg: MobileMoEConfig, tokens: int, out_dir: Path, seed: int = 0) -> float:
        from mobilemoe.train.recipe import ModelSpec
        from mobilemoe.train.run import run_recipe

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result_file = out_dir / "sweep_result.json"
        if result_file.exists():  # trained before a crash that lost the table row
            return float(json.loads(result_file.read_text(encoding="utf-8"))["val_loss"])
        cfg_path = (out_dir / "sweep_config.json").resolve()
        cfg.to_json(cfg_path)
        r = copy.deepcopy(recipe)
        r.model = ModelSpec(config=str(cfg_path), overrides={}, init_seed=recipe.model.init_seed)
        r.seed = recipe.seed + int(seed)
        s = dataclasses.replace(copy.deepcopy(base_stage), tokens=int(tokens), max_steps=None, name="pretrain")
        r.stages = [s]
        reports = run_recipe(r, out_dir, stage="pretrain", resume=True, progress=progress)
        rep = reports[-1]
        if rep.val_loss is None:
            raise SweepError("the run produced no validation loss: give the recipe validation data "
                             "(data.val_fraction > 0), or delete its directory if it finished without one")
        from mobilemoe.utils import atomic_write_text

        atomic_write_text(result_file, json.dumps({"val_loss": float(rep.val_loss), "steps": rep.steps,
                                                   "tokens": rep.tokens, "seconds": rep.seconds}) + "\n")
        return float(rep.val_loss)

    return train_one


def recipe_vocab(recipe_path: str | os.PathLike) -> int:
    from mobilemoe.train.recipe import load_recipe
    from mobilemoe.train.run import build_model_config_vocab

    return build_model_config_vocab(load_recipe(recipe_path))
