"""Router-only ReMoE training, the router delta file, and applying a delta to a model.

Only the MoE routers (gate weights) get gradients; every other tensor is frozen and verified
bit-identical (SHA-256 of its bytes) after training. AdamW on the routers, linear LR warmup then a
schedule from :func:`mobilemoe.train.schedule.lr_at`, gradient accumulation, no load-balancing loss.

Output directory::

    OUT/metrics.jsonl               # one record per optimizer step
    OUT/checkpoints/step-N/         # routers.safetensors + state.pt (optimizer, step), written atomically
    OUT/routers.safetensors         # the router-only delta (format mobilemoe-remoe-routers)
    OUT/report.json                 # settings, losses, integrity check
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mobilemoe.errors import MobileMoEError
from mobilemoe.remoe.adapters import Adapter, load_adapter
from mobilemoe.remoe.losses import LossWeights, remoe_loss
from mobilemoe.train.schedule import lr_at
from mobilemoe.utils import atomic_path, atomic_write_text

DELTA_FORMAT = "mobilemoe-remoe-routers"
DELTA_FILE = "routers.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class RemoeTrainConfig:
    steps: int = 2000
    lr: float = 5e-5
    warmup_steps: int = 200  # LR warmup
    schedule: str = "constant"
    min_lr: float = 0.0
    grad_accum: int = 8
    batch_size: int = 1
    seq_len: int = 2048
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final delta
    keep_checkpoints: int = 2
    log_every: int = 1
    weights: LossWeights = field(default_factory=LossWeights)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16: frozen weights and autocast; routers stay fp32
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward

    def validate(self) -> None:
        from mobilemoe.train.gpu import DEVICES

        if self.device not in DEVICES:
            raise MobileMoEError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise MobileMoEError(f"--dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.steps < 1 or self.grad_accum < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise MobileMoEError(f"bad ReMoE settings: steps={self.steps}, grad_accum={self.grad_accum}, "
                                 f"batch_size={self.batch_size}, seq_len={self.seq_len}")
        if self.lr <= 0:
            raise MobileMoEError(f"--lr must be positive, got {self.lr}")


@dataclass
class RemoeTrainResult:
    steps: int
    loss_first: dict[str, float]
    loss_last: dict[str, float]
    seconds: float
    delta_path: str | None
    frozen_tensors_checked: int
    frozen_identical: bool
    routers_changed: int
    history: list[dict[str, Any]] = field(default_factory=list)


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest() + str(tuple(t.shape)) + str(t.dtype)


def frozen_digests(adapter: Adapter) -> dict[str, str]:
    routers = set(adapter.router_param_names())
    return {k: tensor_digest(v) for k, v in adapter.model.state_dict(keep_vars=False).items() if k not in routers}


def verify_frozen(adapter: Adapter, before: dict[str, str]) -> list[str]:
    """Names of non-router tensors whose bytes changed (empty list: all bit-identical)."""
    after = frozen_digests(adapter)
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


# ---------------------------------------------------------------------- delta files
def save_delta(state: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    md = {"format": DELTA_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=md)
    return path


def load_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise MobileMoEError(f"{p}: no such router delta file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise MobileMoEError(f"{p}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != DELTA_FORMAT:
        raise MobileMoEError(f"{p}: not a ReMoE router delta (metadata format={meta.get('format')!r})")
    return state, meta


def apply_delta(model_dir: str | Path, delta: str | Path, out_dir: str | Path) -> Path:
    """Load ``model_dir``, replace its router weights by ``delta``, save the whole model to ``out_dir``."""
    adapter = load_adapter(model_dir)
    state, _ = load_delta(delta)
    before = frozen_digests(adapter)
    adapter.load_router_state(state)
    changed = verify_frozen(adapter, before)
    if changed:  # pragma: no cover - load_router_state only touches routers
        raise MobileMoEError(f"applying the delta changed non-router tensors: {changed[:5]}")
    return adapter.save(out_dir)


# ---------------------------------------------------------------------- training
def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class RemoeTrainer:
    def __init__(self, adapter: Adapter, cfg: RemoeTrainConfig, source, out_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        from mobilemoe.train.gpu import checkpoint_layers, fused_adamw_ok, resolve_device

        cfg.validate()
        self.adapter, self.cfg, self.source = adapter, cfg, source
        self.out = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        adapter.place(resolve_device(cfg.device), DTYPES[cfg.dtype])
        if cfg.gradient_checkpointing:
            checkpoint_layers(adapter.decoder_layers())
        # only the routers require grad, so only they get gradients and AdamW state
        self.params = adapter.freeze_all_but_routers()
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                     fused=fused_adamw_ok(self.params) or None)
        self.step = 0

    # ---- checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        d = self._ckpt_root() / f"step-{self.step}"
        d.mkdir(parents=True, exist_ok=True)
        save_delta(self.adapter.router_state(), d / DELTA_FILE, {"step": str(self.step)})
        with atomic_path(d / "state.pt") as tmp:
            torch.save({"step": self.step, "optimizer": self.opt.state_dict(),
                        "data": self.source.state_dict()}, tmp)
        atomic_write_text(d / "COMPLETE", "ok\n")  # a checkpoint counts only once this marker exists
        done = sorted((p for p in self._ckpt_root().glob("step-*") if (p / "COMPLETE").exists()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return d

    def load_latest(self) -> bool:
        if self.out is None or not self._ckpt_root().exists():
            return False
        done = sorted((p for p in self._ckpt_root().glob("step-*") if (p / "COMPLETE").exists()),
                      key=lambda p: int(p.name.split("-")[1]))
        if not done:
            return False
        state, _ = load_delta(done[-1] / DELTA_FILE)
        self.adapter.load_router_state(state)
        extra = torch.load(done[-1] / "state.pt", map_location="cpu", weights_only=True)  # tensors and plain values only: no pickled code
        self.opt.load_state_dict(extra["optimizer"])
        self.source.load_state_dict(extra["data"])
        self.step = int(extra["step"])
        return True

    # ---- the loop
    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        lr = lr_at(self.step, peak_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                   schedule=cfg.schedule, min_lr=cfg.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            x, y = self.source.next_batch()
            fwd = self.adapter.forward(x)
            terms = remoe_loss(_ce(fwd.logits, y.to(fwd.logits.device)), fwd.layers, cfg.weights, self.step)
            (terms.total / cfg.grad_accum).backward()
            for k, v in terms.parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "lr": lr, "grad_norm": float(gn), **sums}

    def fit(self, resume: bool = False) -> RemoeTrainResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if resume:
            self.load_latest()
        before = frozen_digests(self.adapter)
        start_routers = self.adapter.router_state()
        history: list[dict[str, Any]] = []
        log = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            log = open(self.out / "metrics.jsonl", "a" if resume else "w", encoding="utf-8")
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="remoe", unit="step", dynamic_ncols=True)
        t0 = time.time()
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                history.append(rec)
                if log is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(ce=f"{rec['ce']:.3f}", rho=f"{rec['rho']:.3f}", kl=f"{rec['trust']:.4f}")
                if self.out is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        seconds = time.time() - t0
        changed = verify_frozen(self.adapter, before)
        if changed:
            raise MobileMoEError(f"non-router tensors changed during ReMoE training: {changed[:8]}")
        end_routers = self.adapter.router_state()
        n_changed = sum(not torch.equal(start_routers[k], end_routers[k]) for k in end_routers)
        delta_path = None
        if self.out is not None:
            meta = {"family": self.adapter.family, "base_model": str(self.adapter.path or ""),
                    "steps": str(self.step), "weights": cfg.weights.to_dict()}
            delta_path = str(save_delta(end_routers, self.out / DELTA_FILE, meta))
        result = RemoeTrainResult(steps=self.step, loss_first=history[0] if history else {},
                                  loss_last=history[-1] if history else {}, seconds=seconds,
                                  delta_path=delta_path, frozen_tensors_checked=len(before),
                                  frozen_identical=not changed, routers_changed=n_changed, history=history)
        if self.out is not None:
            rep = {k: v for k, v in asdict(result).items() if k != "history"}
            rep["config"] = asdict(cfg)
            rep["adapter"] = {k: v for k, v in self.adapter.describe().items() if k != "router_params"}
            atomic_write_text(self.out / "report.json", json.dumps(rep, indent=2, default=str) + "\n")
        return result
