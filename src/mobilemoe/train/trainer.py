"""The training loop, nanoGPT style: one :class:`Trainer`, whose :meth:`Trainer.fit` reads top to bottom.

Per optimizer step:

1. fetch ``grad_accum`` micro-batches, count their loss tokens (all-reduced across ranks), so the
   loss is the exact token-weighted mean over the whole global batch (also with SFT masks);
2. forward/backward each micro-batch (bf16 autocast optional) with loss
   ``CE + z_loss_coef * router_z_loss + lb_loss_coef * switch_loss``;
3. a NaN/inf loss or gradient skips the step (no update), counts it, and stops with a
   :class:`MobileMoEError` after ``max_nan_skips`` skips;
4. clip gradients, set the LR from the schedule, ``AdamW.step()``; weights that come out NaN/inf
   are put back (parameters and optimizer state, from a copy taken before the step) and the step
   is skipped and counted the same way;
5. aux-loss-free balancing: nudge every MoE layer's ``expert_bias`` from the step's expert counts;
6. every ``eval_every`` steps validation loss/perplexity; every ``checkpoint_every`` steps an
   atomic checkpoint (model + optimizer + data-loader state + RNG states + NaN-skip count).

Devices (:mod:`mobilemoe.train.gpu`): ``device`` auto | cpu | cuda; on CUDA autocast runs on the GPU,
AdamW is fused and each decoder layer is compiled (``compile: auto``); ``activation_checkpointing``
recomputes each decoder layer in backward. Both are applied per layer before DDP/FSDP2 wrapping.

``fit(resume=True)`` reloads the newest readable checkpoint in ``out_dir`` (a damaged one is skipped
with a warning) and continues exactly: the same seed gives the same losses as an uninterrupted run.
``train_state.pt`` holds only tensors and plain Python values and is loaded with ``weights_only=True``.
A save that fails (a full disk) removes its temp directory and raises one :class:`TrainingError`
naming the directory; temp directories left by a kill are removed when the next ``fit`` starts.

``metrics.jsonl`` is strict JSON, one record per line: a non-finite value (the loss of a skipped
step) is written as ``null``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mobilemoe.errors import MobileMoEError
from mobilemoe.train.balance import AuxFreeBalancer, count_spread, load_balancing_loss, router_z_loss
from mobilemoe.train.data import IGNORE_INDEX, BatchSource
from mobilemoe.train.distributed import DistInfo, all_reduce_sum, barrier, current, wrap_model
from mobilemoe.train.schedule import SCHEDULES, lr_at
from mobilemoe.utils import atomic_path, atomic_write_text, make_temp_dir

STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"
CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingError(MobileMoEError):
    """Training cannot continue (too many NaN steps, a missing/mismatched checkpoint, ...)."""


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model and data (one recipe stage maps onto this)."""

    max_steps: int = 100  # optimizer steps; the LR schedule spans exactly these
    grad_accum: int = 1
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    weight_decay: float = 0.1  # on matrices only; never on norms, biases or expert_bias
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    dtype: str = "float32"  # autocast: float32 (off) | bfloat16 | float16
    bias_update_rate: float = 1e-3  # aux-loss-free balancing rate (0 disables)
    z_loss_coef: float = 1e-4
    lb_loss_coef: float = 0.0  # Switch-style load-balancing loss (off by default)
    eval_every: int = 0  # 0: only at the end (if a validation source is given)
    eval_steps: int = 4
    checkpoint_every: int = 0  # 0: only the final model
    keep_checkpoints: int = 2
    log_every: int = 1
    max_nan_skips: int = 10
    seed: int = 0
    strategy: str = "none"  # none | ddp | fsdp (used when WORLD_SIZE > 1)
    progress: bool = True  # tqdm bar (main rank only)
    tensorboard: bool = True  # if the tensorboard package is importable
    save_dtype: str | None = None  # cast of the final model file (None keeps fp32)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    compile: bool | str = "auto"  # torch.compile each decoder layer: auto = on CUDA only | true | false

    def validate(self) -> None:
        """Raise :class:`MobileMoEError` naming the first bad field (types, finiteness, bounds)."""
        from mobilemoe.train.distributed import STRATEGIES

        if self.schedule not in SCHEDULES:
            raise MobileMoEError(f"field 'schedule': expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise MobileMoEError(f"field 'dtype': expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.strategy not in STRATEGIES:
            raise MobileMoEError(f"field 'strategy': expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.save_dtype not in (None, *DTYPES):
            raise MobileMoEError(f"field 'save_dtype': expected one of {tuple(DTYPES)}, got {self.save_dtype!r}")
        from mobilemoe.train.gpu import DEVICES

        if self.device not in DEVICES:
            raise MobileMoEError(f"field 'device': expected one of {DEVICES}, got {self.device!r}")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise MobileMoEError(f"field 'compile': expected true, false or 'auto', got {self.compile!r}")
        for name in ("progress", "tensorboard", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise MobileMoEError(f"field '{name}': expected true/false, got {getattr(self, name)!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MobileMoEError(f"field '{name}': expected an integer, got {value!r}")
            if name != "seed" and value < (1 if name in _POSITIVE_INTS else 0):
                bound = "a positive integer" if name in _POSITIVE_INTS else "an integer >= 0"
                raise MobileMoEError(f"field '{name}': expected {bound}, got {value!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2:
            raise MobileMoEError(f"field 'betas': expected two numbers, got {self.betas!r}")
        floats = {name: getattr(self, name) for name in _FLOAT_FIELDS} | {"betas[0]": betas[0], "betas[1]": betas[1]}
        for name, value in floats.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MobileMoEError(f"field '{name}': expected a finite number, got {value!r}")
            if name == "eps" and value <= 0:  # AdamW divides by sqrt(v) + eps
                raise MobileMoEError(f"field 'eps': expected a number > 0, got {value!r}")
            if value < 0:
                raise MobileMoEError(f"field '{name}': expected >= 0, got {value!r}")
        for i, beta in enumerate(betas):
            if beta >= 1:
                raise MobileMoEError(f"field 'betas[{i}]': expected a number in [0, 1), got {beta!r}")
        if self.decay_fraction > 1:
            raise MobileMoEError(f"field 'decay_fraction': expected a number in [0, 1], got {self.decay_fraction!r}")


_INT_FIELDS = ("max_steps", "grad_accum", "warmup_steps", "eval_every", "eval_steps", "checkpoint_every",
               "keep_checkpoints", "log_every", "max_nan_skips", "seed")
_POSITIVE_INTS = ("max_steps", "grad_accum", "eval_steps", "log_every", "keep_checkpoints")
_FLOAT_FIELDS = ("lr", "min_lr", "decay_fraction", "weight_decay", "eps", "grad_clip", "bias_update_rate",
                 "z_loss_coef", "lb_loss_coef")


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)
    nan_skips: int = 0
    final_dir: Path | None = None
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: matrices (decayed) and 1-D tensors/biases (not). Frozen parameters
    (``expert_bias``, requires_grad False) are never given to the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    from mobilemoe.train.gpu import fused_adamw_ok

    fused = fused_adamw_ok(decay + no_decay) or None  # None: torch's default (foreach) off CUDA
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (what ``torch.load(weights_only=True)`` accepts)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``out_dir/checkpoints``, newest first. A ``step-N`` directory only appears
    (by rename) once fully written; temp directories are never listed."""
    found = []
    for path in (Path(out_dir) / CHECKPOINT_DIR).glob("step-*"):
        suffix = path.name[len("step-"):]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found, reverse=True)]


def _read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(train_state, model tensors)`` of one checkpoint; any damage raises."""
    from mobilemoe.checkpoint import load_tensors

    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    needed = ("step", "nan_skips", "optimizer", "data", "rng", "world_size")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise ValueError(f"{STATE_FILE} lacks some of {needed}")
    _, tensors = load_tensors(ckpt)
    return state, tensors


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _write_error(directory: Path, exc: OSError) -> TrainingError:
    return TrainingError(f"{directory}: cannot write the checkpoint: {exc.strerror or exc}; free some space "
                         "(or fix the permissions) and rerun with --resume")


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf are not JSON: they are written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _with_device(info: DistInfo, device: str) -> DistInfo:
    """``info`` with the recipe's device applied: ``auto`` keeps what the process group chose;
    ``cpu``/``cuda`` force it (``cuda`` without a GPU is one clear error)."""
    from mobilemoe.train.gpu import resolve_device

    if device == "auto":
        return info
    want = resolve_device(device)
    if want.type == info.device.type:
        return info
    if want.type == "cuda":
        want = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    if info.enabled:
        raise TrainingError(f"device {device!r}: this process group runs on {info.device.type} "
                            f"(backend {dist.get_backend()}); start it with the same --device")
    return dataclasses.replace(info, device=want)


class Trainer:
    """Train ``model`` on ``train_data``; optional ``val_data``; checkpoints/logs in ``out_dir``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_data: BatchSource,
                 val_data: BatchSource | None = None, out_dir: str | os.PathLike | None = None,
                 dist_info: DistInfo | None = None, extra_state: dict[str, Any] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.raw_model = model  # unwrapped: config, checkpoints, balancer
        self.dist = _with_device(dist_info or current(), cfg.device)
        self.train_data, self.val_data = train_data, val_data
        self.val_start = val_data.state_dict() if val_data is not None else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.extra_state = extra_state or {}  # saved with every checkpoint (e.g. recipe/stage names)
        seed_everything(cfg.seed)
        model.to(self.dist.device)
        self._prepare_layers(model)
        self.model = wrap_model(model, cfg.strategy if self.dist.enabled else "none", self.dist)
        self.optimizer = build_optimizer(self.model, cfg)
        self.balancer = AuxFreeBalancer(model, cfg.bias_update_rate)
        self.router_type = getattr(getattr(model, "config", None), "router_type", "sigmoid")
        self.step = 0  # optimizer steps done (skipped NaN steps count too)
        self.nan_skips = 0
        self._tb = None
        self._backup: list[torch.Tensor] | None = None  # pre-step copy of weights + optimizer state

    def _prepare_layers(self, model: nn.Module) -> None:
        """Activation checkpointing, then torch.compile, per decoder layer (before any sharding, so
        FSDP2's hooks wrap the checkpointed, compiled layer)."""
        from mobilemoe.train.gpu import checkpoint_layers, compile_layers, want_compile

        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            return
        if self.cfg.activation_checkpointing:
            checkpoint_layers(layers)
        if want_compile(self.cfg.compile, self.dist.device):
            compile_layers(layers)

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run until ``cfg.max_steps`` (or ``stop_after`` steps, to simulate an interruption)."""
        cfg = self.cfg
        if self.out_dir is not None and self.dist.is_main:
            self._remove_temp_dirs()
        if resume:
            self.load_latest()
        elif self.step == 0 and self.out_dir is not None and find_checkpoints(self.out_dir):
            # a fresh run would mix its checkpoints with an older run's (and resume from the wrong one)
            raise TrainingError(f"{self.out_dir} already holds checkpoints of another run: resume it, "
                                "or train into an empty directory")
        result = TrainResult(step=self.step, nan_skips=self.nan_skips)
        log = self._open_log(append=resume or self.step > 0)
        bar = self._progress()
        tokens_seen_t0, t0 = 0, time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                if stop_after is not None and self.step >= stop_after:
                    result.stopped_early = True
                    break
                record = self.train_step()
                tokens_seen_t0 += record["tokens"]
                elapsed = max(time.perf_counter() - t0, 1e-9)
                record["tokens_per_s"] = tokens_seen_t0 / elapsed
                result.history.append(record)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log(log, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                last = self.step == cfg.max_steps
                if self.val_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    ev = self.evaluate()
                    result.evals.append(ev)
                    self._log(log, ev)
                if self.out_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.out_dir is not None and not result.stopped_early:
                result.final_dir = self.save_final()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
            if self._tb is not None:
                self._tb.close()
        result.step, result.nan_skips = self.step, self.nan_skips
        return result

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns its metrics record."""
        cfg = self.cfg
        lr = lr_at(self.step, peak_lr=cfg.lr, total_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                   schedule=cfg.schedule, min_lr=cfg.min_lr, decay_fraction=cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()

        # 1. micro-batches and the global number of loss tokens (exact token-weighted mean)
        batches = [self.train_data.next_batch() for _ in range(cfg.grad_accum)]
        n_loss = torch.tensor([float(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches))],
                              device=self.dist.device)
        all_reduce_sum(n_loss)
        n_loss_tokens = max(float(n_loss.item()), 1.0)

        # 2. forward/backward; DDP averages gradients over ranks, hence the world-size factor
        # ce_sum, z, lb, tokens: accumulated on the device, so a GPU step syncs with the host once,
        # not after every micro-batch
        stats = torch.zeros(4, dtype=torch.float64, device=self.dist.device)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            last_micro = i == cfg.grad_accum - 1
            with self._no_sync(not last_micro):  # gradients are all-reduced on the last micro-batch only
                with self._autocast():
                    out = self.model(x, return_router=True)
                ce_sum = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum")
                z = router_z_loss(out.router).to(ce_sum.device)
                with torch.set_grad_enabled(cfg.lb_loss_coef > 0):  # off by default: logged only
                    lb = load_balancing_loss(out.router, self.router_type).to(ce_sum.device)
                loss = ce_sum * (self.dist.world_size / n_loss_tokens) \
                    + (cfg.z_loss_coef * z + cfg.lb_loss_coef * lb) / cfg.grad_accum
                loss.backward()
            self.balancer.observe(out.router)
            stats[:3] += torch.stack([ce_sum.detach().double(), z.detach().double() / cfg.grad_accum,
                                      lb.detach().double() / cfg.grad_accum])
            stats[3] += x.numel()

        # 3. global metrics; NaN/inf anywhere skips the step on every rank
        stats = all_reduce_sum(stats).cpu()
        ce = stats[0].item() / n_loss_tokens
        z_mean, lb_mean = stats[1].item() / self.dist.world_size, stats[2].item() / self.dist.world_size
        grad_norm = self._clip_grads()
        record: dict[str, Any] = {"step": self.step + 1, "loss": ce, "ppl": math.exp(min(ce, 50.0)), "lr": lr,
                                  "z_loss": z_mean, "lb_loss": lb_mean, "grad_norm": grad_norm,
                                  "tokens": int(stats[3].item())}
        if not (math.isfinite(ce) and math.isfinite(z_mean) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(record, "loss or gradient was NaN/inf")

        # 4. update (undone if it leaves NaN/inf weights), then 5. aux-loss-free bias balancing
        had_state = self._backup_weights()
        try:
            self.optimizer.step()
            finite = self._weights_finite()
        except RuntimeError as exc:  # AdamW's step size overflowed float32 (an enormous finite lr)
            if "overflow" not in str(exc):
                raise
            finite = False
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self._restore_weights(had_state)
            return self._skip(record, "weights became NaN/inf after the optimizer step")
        counts = self.balancer.step()
        if counts.numel():
            record["expert_count_spread"] = count_spread(counts)
        self.step += 1
        return record

    def _skip(self, record: dict[str, Any], what: str) -> dict[str, Any]:
        """Count a step that made no update; stop once there were more than ``max_nan_skips``."""
        self.balancer.reset()
        self.nan_skips += 1
        self.step += 1
        record.update(skipped=True, skip_reason=what, nan_skips=self.nan_skips)
        if self.nan_skips > self.cfg.max_nan_skips:
            raise TrainingError(f"{what} at step {self.step}; {self.nan_skips} steps skipped, more than "
                                f"max_nan_skips={self.cfg.max_nan_skips}. Lower the learning rate, check the "
                                "data, or resume from an earlier checkpoint")
        return record

    def _trained_tensors(self) -> tuple[list[torch.Tensor], list[bool]]:
        """Every optimized parameter followed by its optimizer-state tensors, and per parameter
        whether it has optimizer state yet (AdamW creates it on the first step)."""
        tensors, had_state = [], []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p) or {}
                tensors.append(p)
                tensors.extend(v for v in state.values() if torch.is_tensor(v))
                had_state.append(bool(state))
        return tensors, had_state

    @torch.no_grad()
    def _backup_weights(self) -> list[bool]:
        """Copy weights and optimizer state into reused buffers, so a bad step can be undone exactly."""
        tensors, had_state = self._trained_tensors()
        if self._backup is None or [b.shape for b in self._backup] != [t.shape for t in tensors]:
            self._backup = [torch.empty_like(t) for t in tensors]
        for b, t in zip(self._backup, tensors):
            b.copy_(t)
        return had_state

    @torch.no_grad()
    def _restore_weights(self, had_state: list[bool]) -> None:
        backup = iter(self._backup)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for p, had in zip(params, had_state):
            p.copy_(next(backup))
            if not had:  # the step created this state: drop it, as if the step never ran
                self.optimizer.state.pop(p, None)
                continue
            for v in self.optimizer.state[p].values():
                if torch.is_tensor(v):
                    v.copy_(next(backup))

    def _weights_finite(self) -> bool:
        """All optimized weights finite, on every rank (FSDP2: each rank checks its shards)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not params:
            return True
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        # one fused norm per tensor (what clip_grad_norm_ uses) is far cheaper than isfinite().all();
        # a norm is NaN/inf exactly when an entry is (or when the weights are ~1e19: broken anyway)
        norms = torch.stack(torch._foreach_norm(local))
        bad = (~torch.isfinite(norms)).sum().float().reshape(1)
        return all_reduce_sum(bad).item() == 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss/perplexity over ``eval_steps`` batches, always the same ones."""
        assert self.val_data is not None
        self.val_data.load_state_dict(self.val_start)
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for _ in range(self.cfg.eval_steps):
            x, y = self.val_data.next_batch()
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            with self._autocast():
                logits = self.model(x).logits
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
            totals += torch.tensor([ce.item(), float((y != IGNORE_INDEX).sum())], dtype=torch.float64)
        totals = all_reduce_sum(totals.to(self.dist.device)).cpu()
        val = totals[0].item() / max(totals[1].item(), 1.0)
        self.model.train()
        return {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    # ------------------------------------------------------------------ checkpoints
    def model_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) model state on CPU. Collective under FSDP: call on every rank."""
        if self.dist.enabled and self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        if self.dist.enabled and self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNNN`` atomically (temp dir + rename), then point ``latest`` at it."""
        from mobilemoe.checkpoint import save_tensors

        assert self.out_dir is not None
        model_state, optim_state = self.model_state(), self.optimizer_state()
        # per-rank states (RNG, data position: every rank reads its own slice), gathered on rank 0
        per_rank = [None] * self.dist.world_size
        mine = {"rng": _rng_state(), "data": self.train_data.state_dict()}
        if self.dist.enabled:
            dist.all_gather_object(per_rank, mine)
        else:
            per_rank[0] = mine
        root = self.out_dir / CHECKPOINT_DIR
        final = root / f"step-{self.step:07d}"
        if self.dist.is_main:
            state = {"step": self.step, "nan_skips": self.nan_skips, "optimizer": optim_state,
                     "data": [r["data"] for r in per_rank], "rng": [r["rng"] for r in per_rank],
                     "world_size": self.dist.world_size,
                     "config": dataclasses.asdict(self.cfg), "extra": self.extra_state}
            tmp = None
            try:
                root.mkdir(parents=True, exist_ok=True)
                tmp = make_temp_dir(root, f".tmp-{final.name}-")
                save_tensors(model_state, self.raw_model.config, tmp)
                with atomic_path(tmp / STATE_FILE) as t:
                    torch.save(state, t)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic_write_text(self.out_dir / LATEST_FILE, f"{CHECKPOINT_DIR}/{final.name}\n")
            except OSError as exc:  # a full disk: one clear error, and no half-written temp dir left behind
                raise _write_error(root, exc) from None
            finally:
                if tmp is not None and tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            self._prune_checkpoints()
        barrier()
        return final

    def _prune_checkpoints(self) -> None:
        ckpts = sorted((self.out_dir / CHECKPOINT_DIR).glob("step-*"))
        for old in ckpts[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self) -> Path:
        """The trained model as a plain checkpoint in ``out_dir/final`` (what the next stage loads)."""
        from mobilemoe.checkpoint import save_tensors

        assert self.out_dir is not None
        state = self.model_state()
        final = self.out_dir / FINAL_DIR
        if self.dist.is_main:
            cfg = self.raw_model.config
            if self.cfg.save_dtype not in (None, "float32"):
                dtype = getattr(torch, self.cfg.save_dtype)
                routers = {k for k in state if k.endswith("router.weight")}
                state = {k: v if k in routers or not v.is_floating_point() else v.to(dtype) for k, v in state.items()}
                cfg = cfg.replace(torch_dtype=self.cfg.save_dtype)
            summary = json.dumps({"step": self.step, "nan_skips": self.nan_skips, **self.extra_state},
                                 indent=2, default=str) + "\n"
            tmp = None
            try:  # written beside, then renamed: final/ is either the old model or the whole new one
                tmp = make_temp_dir(self.out_dir, f".tmp-{FINAL_DIR}-")
                save_tensors(state, cfg, tmp)
                atomic_write_text(tmp / "train_summary.json", summary)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as exc:
                raise _write_error(self.out_dir, exc) from None
            finally:
                if tmp is not None and tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (not necessarily readable: see :meth:`load_latest`)."""
        found = find_checkpoints(self.out_dir) if self.out_dir is not None else []
        return found[0] if found else None

    def load_latest(self) -> bool:
        """Restore model, optimizer, data position, RNG and counters from the newest readable
        checkpoint; a damaged one (truncated file, bad pickle) is skipped with a warning."""
        found = find_checkpoints(self.out_dir) if self.out_dir is not None else []
        if not found:
            where = self.out_dir if self.out_dir is not None else "(no output directory)"
            raise TrainingError(f"--resume: no checkpoint found in {where} (expected "
                                f"{CHECKPOINT_DIR}/step-*/{STATE_FILE})")
        for ckpt in found:
            try:
                state, tensors = _read_checkpoint(ckpt)
                break
            except Exception as exc:  # any failure to read is damage: fall back to the one before
                if self.dist.is_main:
                    reason = (str(exc).strip().splitlines() or [""])[0][:200]
                    _warn(f"{ckpt}: cannot read the checkpoint ({type(exc).__name__}: {reason}); "
                          "falling back to the one before it")
        else:
            raise TrainingError(f"--resume: none of the {len(found)} checkpoints in {self.out_dir / CHECKPOINT_DIR} "
                                "could be read (see the warnings); rerun without --resume (--force) to start over")
        if state.get("world_size", 1) != self.dist.world_size:
            raise TrainingError(f"{ckpt}: saved with {state.get('world_size')} processes, resuming with "
                                f"{self.dist.world_size}; exact resume needs the same world size")
        if self.dist.enabled and self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, tensors, options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            missing = self.raw_model.load_state_dict(tensors, strict=False)
            if missing.missing_keys or missing.unexpected_keys:
                raise TrainingError(f"{ckpt}: model tensors do not match: {missing}")
            self.optimizer.load_state_dict(state["optimizer"])
        self.train_data.load_state_dict(state["data"][self.dist.rank])
        _set_rng_state(state["rng"][self.dist.rank])
        self.step, self.nan_skips = int(state["step"]), int(state["nan_skips"])
        if self.dist.is_main:
            self._truncate_metrics()
        if self.step > self.cfg.max_steps:
            raise TrainingError(f"{ckpt}: checkpoint is at step {self.step}, past max_steps {self.cfg.max_steps}")
        return True

    def _truncate_metrics(self) -> None:
        """Drop log records after the checkpoint (and a line cut by a kill), so the resumed log reads
        like one uninterrupted run."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= self.step:
                kept.append(line)
        atomic_write_text(path, "".join(l + "\n" for l in kept))

    # ------------------------------------------------------------------ helpers
    def _clip_grads(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _autocast(self):
        dtype = DTYPES[self.cfg.dtype]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=dtype)

    def _no_sync(self, skip: bool):
        if skip and hasattr(self.model, "no_sync"):
            return self.model.no_sync()  # DDP: no gradient all-reduce until the last micro-batch
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()

    def _remove_temp_dirs(self) -> None:
        """Temp directories of saves that a kill or a full disk interrupted."""
        for pattern in (f"{CHECKPOINT_DIR}/.tmp-*", f".tmp-{FINAL_DIR}-*"):
            for tmp in self.out_dir.glob(pattern):
                shutil.rmtree(tmp, ignore_errors=True)

    def _open_log(self, append: bool):
        """The metrics file: appended to when continuing a run, started afresh otherwise (a fresh
        run must not inherit the records of an earlier one)."""
        if self.out_dir is None or not self.dist.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb = None
        return open(self.out_dir / METRICS_FILE, "a" if append else "w", encoding="utf-8")

    def _log(self, fh, record: dict[str, Any]) -> None:
        if fh is not None:
            fh.write(json.dumps({**_json_safe(record), "time": time.time()}, allow_nan=False) + "\n")
            fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key}",
                                        value, record["step"])

    def _progress(self):
        if not self.cfg.progress or not self.dist.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
