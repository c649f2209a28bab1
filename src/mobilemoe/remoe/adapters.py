"""Model adapters for ReMoE: find the routers, expose per-layer router logits + top-K for a forward.

Two kinds:

* :class:`MobileMoEAdapter` -- a MobileMoE checkpoint (``model_type: mobilemoe``): routers are
  ``model.layers.N.feed_forward.router.weight``; scoring per ``router_type``; top-k of
  ``score + expert_bias`` (:func:`mobilemoe.moe.route`).
* :class:`HFAdapter` -- a Hugging Face ``transformers`` (5.x) MoE model in a local directory.
  transformers 5 gives every MoE family a router module (``*TopKRouter``/``*TopkRouter``) holding
  ``weight`` [E, H] and returning ``(router_logits, weights, indices)``; a forward hook captures its
  input hidden state, its logits (with grad) and the experts it chose.

Each adapter also keeps a frozen fp32 copy of the original router weights, so the Trust-KL
reference ``P_ref`` is the original router applied to the *same* hidden state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mobilemoe.errors import MobileMoEError
from mobilemoe.layout import tensor_specs
from mobilemoe.remoe.losses import LayerRouting, router_probs


class AdapterError(MobileMoEError):
    """A model directory ReMoE cannot work with (no MoE layers, unsupported family)."""


# model_type -> (family, scoring, top-k rule)
HF_FAMILIES: dict[str, tuple[str, str, str]] = {
    "mixtral": ("mixtral", "softmax", "topk_probs"),
    "qwen2_moe": ("qwen2_moe", "softmax", "topk_probs"),
    "qwen3_moe": ("qwen3_moe", "softmax", "topk_probs"),
    "olmoe": ("olmoe", "softmax", "topk_probs"),
    "deepseek_v3": ("deepseek_v3", "sigmoid", "group_limited_biased"),
    "granitemoe": ("granitemoe", "softmax", "topk_logits"),
}


@dataclass
class Capture:
    hidden: torch.Tensor  # [N, H] router input
    logits: torch.Tensor  # [N, E] fp32 (grad flows to the router weight)
    expert_ids: torch.Tensor  # [N, K]


@dataclass
class RouterForward:
    logits: torch.Tensor  # LM logits [B, T, V]
    layers: list[LayerRouting]


class Adapter:
    """Common machinery; subclasses fill in the model specifics."""

    family: str = ""
    scoring: str = "softmax"
    topk_rule: str = "topk_probs"

    def __init__(self, model: nn.Module, path: str | None = None) -> None:
        self.model = model
        self.path = path
        self._captures: list[Capture | None] = []
        self._hooks: list = []
        names = self.router_param_names()
        if not names:
            raise AdapterError(self._describe("no MoE router modules found"))
        params = dict(model.named_parameters())
        self.ref_weights = [params[n].detach().float().clone() for n in names]
        self.autocast_dtype: torch.dtype | None = None  # set by place(): the forward's autocast

    # ---- to implement
    def router_param_names(self) -> list[str]:
        raise NotImplementedError

    def hook_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _unpack(self, module, inputs, output) -> Capture:
        raise NotImplementedError

    def _lm_logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """The family's top-K rule applied to fp32 logits [N, E] -> ids [N, K]."""
        raise NotImplementedError

    @property
    def num_experts(self) -> int:
        return self.ref_weights[0].shape[0]

    @property
    def top_k(self) -> int:
        raise NotImplementedError

    def _describe(self, what: str) -> str:
        cfg = getattr(self.model, "config", None)
        mt = getattr(cfg, "model_type", None)
        arch = getattr(cfg, "architectures", None)
        return f"{self.path or 'model'}: {what} (model_type={mt!r}, architectures={arch!r})"

    # ---- device, dtype, checkpointing
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def place(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        """Move the model to ``device`` with its frozen weights in ``dtype``. Routers (and selection
        biases) stay fp32 master weights: a bf16 router would round away updates of lr-size
        (5e-5 of a ~0.02 weight is below bf16's 2^-8 step). The forward then runs under autocast."""
        keep = set(self.router_param_names())
        self.model.to(device)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if p.is_floating_point():
                    fp32 = name in keep or name.endswith(("expert_bias", "e_score_correction_bias"))
                    p.data = p.data.to(torch.float32 if fp32 else dtype)
        self.ref_weights = [w.to(device) for w in self.ref_weights]
        self.autocast_dtype = None if dtype == torch.float32 else dtype

    def autocast(self):
        """The forward's mixed-precision context (a no-op in fp32)."""
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers (``model.model.layers`` in MobileMoE and every supported HF family)."""
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise AdapterError(self._describe("no model.model.layers to checkpoint"))
        return layers

    # ---- shared
    @property
    def num_layers(self) -> int:
        return len(self.ref_weights)

    def router_parameters(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.router_param_names()]

    def freeze_all_but_routers(self) -> list[nn.Parameter]:
        for p in self.model.parameters():
            p.requires_grad_(False)
        routers = self.router_parameters()
        for p in routers:
            p.requires_grad_(True)
        return routers

    def router_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone().contiguous()
                for n, p in zip(self.router_param_names(), self.router_parameters())}

    def load_router_state(self, state: dict[str, torch.Tensor]) -> None:
        names = self.router_param_names()
        missing = [n for n in names if n not in state]
        extra = [n for n in state if n not in names]
        if missing or extra:
            raise AdapterError(f"router delta does not match the model: missing {missing[:6]}, unexpected {extra[:6]}")
        with torch.no_grad():
            for n, p in zip(names, self.router_parameters()):
                if tuple(state[n].shape) != tuple(p.shape):
                    raise AdapterError(f"router delta {n}: shape {tuple(state[n].shape)}, model has {tuple(p.shape)}")
                p.copy_(state[n].to(p.dtype))

    def _hook(self, idx: int) -> Callable:
        def fn(module, inputs, output):
            self._captures[idx] = self._unpack(module, inputs, output)
        return fn

    def forward(self, ids: torch.Tensor, with_ref: bool = True) -> RouterForward:
        """Run the model on ids [B, T]; per MoE layer the router logits, reference logits and top-K."""
        B, T = ids.shape
        mods = self.hook_modules()
        self._captures = [None] * len(mods)
        handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(mods)]
        try:
            lm = self._lm_logits(ids)
        finally:
            for h in handles:
                h.remove()
        layers = []
        for i, cap in enumerate(self._captures):
            if cap is None:
                raise AdapterError(self._describe(f"router {i} did not run in the forward"))
            E = cap.logits.shape[-1]
            if with_ref:
                ref = F.linear(cap.hidden.detach().float(), self.ref_weights[i].to(cap.hidden.device))
            else:
                ref = cap.logits.detach()
            layers.append(LayerRouting(logits=cap.logits.float().reshape(B, T, E),
                                       ref_logits=ref.reshape(B, T, E),
                                       expert_ids=cap.expert_ids.reshape(B, T, -1).long(),
                                       scoring=self.scoring))
        self._captures = []
        return RouterForward(lm, layers)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return router_probs(logits, self.scoring)

    def describe(self) -> dict:
        return {"family": self.family, "scoring": self.scoring, "topk_rule": self.topk_rule,
                "moe_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "router_params": self.router_param_names()}

    def save(self, out_dir: str | Path) -> Path:
        raise NotImplementedError


# ---------------------------------------------------------------------- MobileMoE
class MobileMoEAdapter(Adapter):
    family = "mobilemoe"
    topk_rule = "topk_biased"

    def __init__(self, model: nn.Module, path: str | None = None) -> None:
        self.scoring = model.config.router_type
        self._blocks = [(i, layer.feed_forward) for i, layer in enumerate(model.model.layers) if layer.is_moe]
        super().__init__(model, path)

    def router_param_names(self) -> list[str]:
        return [s.name for s in tensor_specs(self.model.config) if s.role == "router"]

    def hook_modules(self) -> list[nn.Module]:
        return [b for _, b in self._blocks]

    def _unpack(self, module, inputs, output) -> Capture:
        x = inputs[0]
        routing = output[1]
        return Capture(x.reshape(-1, x.shape[-1]), routing.logits, routing.expert_ids)

    def _lm_logits(self, ids):
        with self.autocast():
            return self.model(ids.to(self.device)).logits

    @property
    def top_k(self) -> int:
        return self.model.config.num_experts_per_tok

    def select(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        from mobilemoe.moe import route

        block = self._blocks[layer][1]
        return route(logits.float(), block.expert_bias, self.model.config).expert_ids

    def save(self, out_dir):
        from mobilemoe.checkpoint import save_checkpoint

        name = getattr(self.model.config, "torch_dtype", None)  # keep the source checkpoint's dtype
        dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None
        out = save_checkpoint(self.model, out_dir, dtype=dtype)
        _copy_tokenizer(self.path, out)
        return Path(out)


# ---------------------------------------------------------------------- Hugging Face
def _is_router(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    w = getattr(module, "weight", None)
    return name.endswith("topkrouter") and isinstance(w, torch.Tensor) and w.ndim == 2


class HFAdapter(Adapter):
    def __init__(self, model: nn.Module, path: str | None = None) -> None:
        mt = getattr(model.config, "model_type", None)
        if mt not in HF_FAMILIES:
            raise AdapterError(_unsupported_msg(path, mt, getattr(model.config, "architectures", None)))
        self.family, self.scoring, self.topk_rule = HF_FAMILIES[mt]
        self._routers = [(n, m) for n, m in model.named_modules() if _is_router(m)]
        super().__init__(model, path)

    def router_param_names(self) -> list[str]:
        return [f"{n}.weight" for n, _ in self._routers]

    def hook_modules(self):
        return [m for _, m in self._routers]

    def _unpack(self, module, inputs, output) -> Capture:
        x = inputs[0]
        logits, _, idx = output
        return Capture(x.reshape(-1, x.shape[-1]), logits, idx)

    def _lm_logits(self, ids):
        with self.autocast():
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    @property
    def top_k(self) -> int:
        return int(self._routers[0][1].top_k)

    def select(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        router = self._routers[layer][1]
        logits = logits.float()
        K = self.top_k
        if self.topk_rule == "topk_logits":
            return logits.topk(K, dim=-1).indices
        if self.topk_rule == "topk_probs":
            return torch.softmax(logits, -1).topk(K, dim=-1).indices
        # DeepSeek-V3: sigmoid + correction bias, best `topk_group` of `n_group` groups (top-2 sum), then top-K
        s = torch.sigmoid(logits) + router.e_score_correction_bias.float()
        G = router.num_group
        gs = s.view(-1, G, s.shape[-1] // G).topk(min(2, s.shape[-1] // G), dim=-1)[0].sum(-1)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(router.topk_group, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand(-1, G, s.shape[-1] // G).reshape(s.shape).bool()
        return s.masked_fill(~mask, float("-inf")).topk(K, dim=-1).indices

    def save(self, out_dir):
        out = Path(out_dir)
        self.model.save_pretrained(out)
        _copy_tokenizer(self.path, out)
        return out


# ---------------------------------------------------------------------- loading
def _copy_tokenizer(src: str | None, out) -> None:
    import shutil

    if not src:
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = Path(src) / name
        if p.is_file() and not (Path(out) / name).exists():
            shutil.copy2(p, Path(out) / name)


def _unsupported_msg(path, model_type, architectures) -> str:
    return (f"{path or 'model'}: unsupported or non-MoE model family (model_type={model_type!r}, "
            f"architectures={architectures!r}); ReMoE supports mobilemoe and the transformers families "
            f"{sorted(HF_FAMILIES)}")


def read_config_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"{p}: not a model directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise AdapterError(f"{p}: no config.json (not a model directory)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg}: invalid JSON ({exc})") from None


def wrap_model(model: nn.Module, path: str | None = None) -> Adapter:
    """An adapter around an already-built model (MobileMoE or transformers)."""
    from mobilemoe.model import MobileMoEForCausalLM

    if isinstance(model, MobileMoEForCausalLM):
        return MobileMoEAdapter(model, path)
    return HFAdapter(model, path)


def load_adapter(path: str | Path, dtype: torch.dtype = torch.float32) -> Adapter:
    """Load a model directory (MobileMoE checkpoint or a local transformers MoE model); never downloads."""
    data = read_config_json(path)
    mt, arch = data.get("model_type"), data.get("architectures")
    if mt == "mobilemoe":
        from mobilemoe.checkpoint import load_model

        model = load_model(path, dtype=dtype)
        model.eval()
        return MobileMoEAdapter(model, str(path))
    if mt not in HF_FAMILIES:
        raise AdapterError(_unsupported_msg(path, mt, arch))
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover
        raise AdapterError(f"{path}: loading a {mt} model needs the 'transformers' package ({exc})") from None
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.eval()
    return HFAdapter(model, str(path))
