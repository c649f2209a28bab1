"""The training loop, nanoGPT style: one :class:`Trainer`, whose :meth:`Trainer.fit` reads top to bottom.

Per optimizer step:

1. fetch ``grad_accum`` micro-batches, count their loss tokens (all-reduced across ranks), so the
   loss is the exact token-weighted mean over the whole global batch (also with SFT masks);
2. forward/backward each micro-batch (bf16 autocast optional) with loss
   ``CE + z_loss_coef * router_z_loss + lb_loss_coef * switch_loss``;
3. a NaN/inf loss or gradient skips the step (no update), counts it, and stops with a
   :class:`MobileMoEError` after ``max_nan_skips`` skips;
4. clip gradients, set the LR from the schedule, ``AdamW.step()``;
5. aux-loss-free balancing: nudge every MoE layer's ``expert_bias`` from the step's expert counts;
6. every ``eval_every`` steps validation loss/perplexity; every ``checkpoint_every`` steps an
   atomic checkpoint (model + optimizer + data-loader state + RNG states + NaN-skip count).

``fit(resume=True)`` reloads the newest checkpoint in ``out_dir`` and continues exactly: the same
seed gives the same losses as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
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
from mobilemoe.utils import atomic_path, atomic_write_text

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

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise MobileMoEError(f"field 'schedule': expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise MobileMoEError(f"field 'dtype': expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("max_steps", "grad_accum", "eval_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise MobileMoEError(f"field '{name}': expected a positive integer, got {getattr(self, name)!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "bias_update_rate", "z_loss_coef",
                     "lb_loss_coef", "warmup_steps", "eval_every", "checkpoint_every", "max_nan_skips"):
            if getattr(self, name) < 0:
                raise MobileMoEError(f"field '{name}': expected >= 0, got {getattr(self, name)!r}")


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train ``model`` on ``train_data``; optional ``val_data``; checkpoints/logs in ``out_dir``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_data: BatchSource,
                 val_data: BatchSource | None = None, out_dir: str | os.PathLike | None = None,
                 dist_info: DistInfo | None = None, extra_state: dict[str, Any] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.raw_model = model  # unwrapped: config, checkpoints, balancer
        self.dist = dist_info or current()
        self.train_data, self.val_data = train_data, val_data
        self.val_start = val_data.state_dict() if val_data is not None else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.extra_state = extra_state or {}  # saved with every checkpoint (e.g. recipe/stage names)
        seed_everything(cfg.seed)
        model.to(self.dist.device)
        self.model = wrap_model(model, cfg.strategy if self.dist.enabled else "none", self.dist)
        self.optimizer = build_optimizer(self.model, cfg)
        self.balancer = AuxFreeBalancer(model, cfg.bias_update_rate)
        self.router_type = getattr(getattr(model, "config", None), "router_type", "sigmoid")
        self.step = 0  # optimizer steps done (skipped NaN steps count too)
        self.nan_skips = 0
        self._tb = None

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run until ``cfg.max_steps`` (or ``stop_after`` steps, to simulate an interruption)."""
        cfg = self.cfg
        if resume:
            self.load_latest()
        result = TrainResult(step=self.step, nan_skips=self.nan_skips)
        log = self._open_log()
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
        stats = torch.zeros(4, dtype=torch.float64)  # ce_sum, z, lb, tokens
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
            stats += torch.tensor([ce_sum.item(), z.item() / cfg.grad_accum, lb.item() / cfg.grad_accum,
                                   x.numel()], dtype=torch.float64)

        # 3. global metrics; NaN/inf anywhere skips the step on every rank
        stats = all_reduce_sum(stats.to(self.dist.device)).cpu()
        ce = stats[0].item() / n_loss_tokens
        z_mean, lb_mean = stats[1].item() / self.dist.world_size, stats[2].item() / self.dist.world_size
        grad_norm = self._clip_grads()
        record: dict[str, Any] = {"step": self.step + 1, "loss": ce, "ppl": math.exp(min(ce, 50.0)), "lr": lr,
                                  "z_loss": z_mean, "lb_loss": lb_mean, "grad_norm": grad_norm,
                                  "tokens": int(stats[3].item())}
        if not (math.isfinite(ce) and math.isfinite(z_mean) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.balancer.reset()
            self.nan_skips += 1
            self.step += 1
            record.update(skipped=True, nan_skips=self.nan_skips)
            if self.nan_skips > cfg.max_nan_skips:
                raise TrainingError(f"loss or gradient was NaN/inf at step {self.step}; {self.nan_skips} steps "
                                    f"skipped, more than max_nan_skips={cfg.max_nan_skips}. Lower the learning "
                                    "rate, check the data, or resume from an earlier checkpoint")
            return record

        # 4. update, then 5. aux-loss-free bias balancing from this step's expert counts
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = self.balancer.step()
        if counts.numel():
            record["expert_count_spread"] = count_spread(counts)
        self.step += 1
        return record

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
        final = self.out_dir / CHECKPOINT_DIR / f"step-{self.step:07d}"
        if self.dist.is_main:
            tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            save_tensors(model_state, self.raw_model.config, tmp)
            state = {"step": self.step, "nan_skips": self.nan_skips, "optimizer": optim_state,
                     "data": [r["data"] for r in per_rank], "rng": [r["rng"] for r in per_rank],
                     "world_size": self.dist.world_size,
                     "config": dataclasses.asdict(self.cfg), "extra": self.extra_state}
            with atomic_path(tmp / STATE_FILE) as t:
                torch.save(state, t)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.out_dir / LATEST_FILE, f"{CHECKPOINT_DIR}/{final.name}\n")
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
            save_tensors(state, cfg, final)
            atomic_write_text(final / "train_summary.json",
                              json.dumps({"step": self.step, "nan_skips": self.nan_skips, **self.extra_state},
                                         indent=2, default=str) + "\n")
        barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        if self.out_dir is None:
            return None
        pointer = self.out_dir / LATEST_FILE
        if not pointer.exists():
            return None
        path = self.out_dir / pointer.read_text().strip()
        return path if (path / STATE_FILE).exists() else None

    def load_latest(self) -> bool:
        """Restore model, optimizer, data position, RNG and counters from the newest checkpoint."""
        from mobilemoe.checkpoint import load_tensors

        ckpt = self.latest_checkpoint()
        if ckpt is None:
            where = self.out_dir if self.out_dir is not None else "(no output directory)"
            raise TrainingError(f"--resume: no checkpoint found in {where} (expected a '{LATEST_FILE}' file "
                                f"pointing at {CHECKPOINT_DIR}/step-*/{STATE_FILE})")
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != self.dist.world_size:
            raise TrainingError(f"{ckpt}: saved with {state.get('world_size')} processes, resuming with "
                                f"{self.dist.world_size}; exact resume needs the same world size")
        _, tensors = load_tensors(ckpt)
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

    def _open_log(self):
        if self.out_dir is None or not self.dist.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb = None
        return open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")

    def _log(self, fh, record: dict[str, Any]) -> None:
        if fh is not None:
            fh.write(json.dumps({**record, "time": time.time()}) + "\n")
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
