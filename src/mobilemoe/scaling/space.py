"""The architecture design space of the on-device scaling law: a few integers -> a :class:`MobileMoEConfig`.

Convention for experts ``E``, granularity ``g``, top-``k`` and shared slots ``s``
(DeepSeekMoE's fine-grained segmentation + shared-expert isolation, the convention that
reproduces the published MobileMoE tiers exactly):

* ``d_ff = ffn_ratio * d_model`` (``ffn_ratio`` 4): the width of one *coarse* expert (= a dense FFN).
* ``E`` coarse experts, each split ``g`` ways: ``E * g`` fine slots of width ``d_ff / g``.
* ``k`` is the *coarse* top-k: a token uses ``k * g`` fine slots, i.e. ``k * d_ff`` of FFN width,
  whatever ``g`` and ``s`` are (granularity and shared experts keep active compute fixed).
* ``s`` of those slots are isolated into the shared expert (always active): one SwiGLU of width
  ``s * d_ff / g`` (the config holds at most one shared expert module, so ``s`` slots are merged).
* so the router sees ``num_local_experts = E*g - s`` experts of width ``intermediate_size = d_ff/g``
  and picks ``num_experts_per_tok = k*g - s`` of them.
* ``E == k`` (no sparsity) is the dense model: every layer one SwiGLU of width ``k * d_ff``.

The published tiers are ``E=8, g=8, k=1, s=4``: 64 - 4 = 60 routed experts of width ``d_ff/8``,
top 8 - 4 = 4, shared width 4 x routed (``mobilemoe-s``: d 768, d_ff 3072 -> 60 x 384 top-4, shared 1536).
The paper's "top-4" is the router's fine-grained top-k (``k*g - s``); "g = 8" is ``g`` here.

The scaling law's expert count is the *expansion ratio* ``E_law = E / k`` (routed pool over
active FFN width; 1 for dense, so the joint law reduces to Chinchilla for dense models).

Shape rule (the law itself is blind to depth vs width): ``head_dim`` 64, 4 KV heads, query
heads ``4 * round(d_model / 256)``, and layers around ``d_model / 40`` (the tiers: 768/20,
1024/26, 1280/32 all satisfy ``layers == ceil(d_model / 40)``).

All parameter/byte/FLOP numbers come from :mod:`mobilemoe.accounting`; nothing is recomputed here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

from mobilemoe import accounting
from mobilemoe.config import LLAMA3_ROPE_SCALING, ConfigError, MobileMoEConfig
from mobilemoe.errors import MobileMoEError

DEFAULT_VOCAB = 128256
ASPECT = 40.0  # d_model / layers of the published tiers


class SpaceError(MobileMoEError, ValueError):
    """An architecture point is inconsistent (the message names the field)."""


@dataclass(frozen=True)
class Family:
    """An architecture family of the law: everything but size (d_model, layers) and ``E``... and ``E``.

    The joint law is fitted per ``(k, g, s)`` with ``E`` varying inside (plus dense runs, ``E == k``);
    the per-family Chinchilla fit pins ``E`` too (``key(with_e=True)``).
    """

    k: int = 1
    g: int = 1
    s: int = 0

    def key(self) -> str:
        return f"k{self.k}-g{self.g}-s{self.s}"

    @classmethod
    def parse(cls, key: str) -> "Family":
        try:
            parts = dict((p[0], int(p[1:])) for p in key.split("-"))
            return cls(k=parts["k"], g=parts["g"], s=parts["s"])
        except (KeyError, ValueError, IndexError):
            raise SpaceError(f"bad family key {key!r}: expected 'k<int>-g<int>-s<int>' (e.g. k1-g8-s4)") from None


@dataclass(frozen=True)
class Arch:
    """One point of the design space (see the module docstring for the convention)."""

    d_model: int
    layers: int
    E: int = 1  # coarse experts (E == k: dense)
    g: int = 1  # granularity
    k: int = 1  # coarse top-k
    s: int = 0  # fine slots isolated into the shared expert
    vocab: int = DEFAULT_VOCAB
    ffn_ratio: int = 4
    head_dim: int = 64
    kv_heads: int = 4
    heads: int | None = None  # None: 4 * round(d_model / 256)
    tie_embeddings: bool = True

    # -------------------------------------------------------------- derived
    @property
    def is_dense(self) -> bool:
        return self.E == self.k

    @property
    def d_ff(self) -> int:
        return self.ffn_ratio * self.d_model

    @property
    def n_heads(self) -> int:
        if self.heads is not None:
            return self.heads
        return max(self.kv_heads, self.kv_heads * round(self.d_model / (self.head_dim * self.kv_heads)))

    @property
    def routed_experts(self) -> int:
        return 0 if self.is_dense else self.E * self.g - self.s

    @property
    def routed_top_k(self) -> int:
        return 0 if self.is_dense else self.k * self.g - self.s

    @property
    def expert_width(self) -> int:
        return self.d_ff // self.g

    @property
    def e_law(self) -> float:
        """The law's expert count: expansion ratio E / k (1 for dense)."""
        return self.E / self.k

    @property
    def family(self) -> Family:
        return Family(k=self.k, g=self.g, s=self.s) if not self.is_dense else Family(1, 1, 0)

    def label(self) -> str:
        if self.is_dense:
            return f"dense d{self.d_model} L{self.layers} ff{self.k * self.d_ff}"
        return (f"MoE d{self.d_model} L{self.layers} E{self.E} g{self.g} k{self.k} s{self.s} "
                f"({self.routed_experts}x{self.expert_width} top-{self.routed_top_k}"
                f"{f' +shared {self.s * self.expert_width}' if self.s else ''})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -------------------------------------------------------------- checks + config
    def check(self) -> None:
        for name in ("d_model", "layers", "E", "g", "k", "vocab", "ffn_ratio", "head_dim", "kv_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpaceError(f"field '{name}': expected a positive integer, got {v!r}")
        if isinstance(self.s, bool) or not isinstance(self.s, int) or self.s < 0:
            raise SpaceError(f"field 's': expected a non-negative integer, got {self.s!r}")
        if self.E < self.k:
            raise SpaceError(f"field 'E': expected >= k ({self.k}) coarse experts, got {self.E}")
        if self.is_dense:
            return
        if self.d_ff % self.g:
            raise SpaceError(f"field 'g': d_ff ({self.d_ff}) must split into {self.g} equal experts")
        if self.s >= self.k * self.g:
            raise SpaceError(f"field 's': expected fewer shared slots than k*g ({self.k * self.g}), got {self.s}"
                             " (the router needs at least one expert to pick)")

    def to_config(self, **overrides: Any) -> MobileMoEConfig:
        """The :class:`MobileMoEConfig` of this point (released-tier defaults for everything else)."""
        self.check()
        heads = self.n_heads
        base: dict[str, Any] = dict(
            vocab_size=self.vocab, hidden_size=self.d_model, num_hidden_layers=self.layers,
            num_attention_heads=heads, num_key_value_heads=min(self.kv_heads, heads), head_dim=self.head_dim,
            max_position_embeddings=8192, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING),
            tie_word_embeddings=self.tie_embeddings)
        if self.is_dense:
            width = self.k * self.d_ff
            base.update(intermediate_size=width, intermediate_size_mlp=width, num_local_experts=0,
                        num_experts_per_tok=0, num_shared_experts=0, routed_scaling_factor=1.0)
        else:
            w = self.expert_width
            base.update(intermediate_size=w, intermediate_size_mlp=(self.s or 1) * w,
                        num_local_experts=self.routed_experts, num_experts_per_tok=self.routed_top_k,
                        num_shared_experts=1 if self.s else 0, routed_scaling_factor=2.5)
        base.update(overrides)
        try:
            return MobileMoEConfig.from_dict(base, source=f"arch {self.label()}")
        except ConfigError as exc:
            raise SpaceError(str(exc)) from None

    def int4_ok(self) -> bool:
        """Every packed axis splits into whole INT4 groups (the mobilemoe-int4-g32 format)."""
        from mobilemoe.formats import GROUP_SIZE as G

        return (self.d_model % G == 0 and self.n_heads * self.head_dim % G == 0
                and (self.is_dense or self.expert_width % G == 0))


def arch_from_config(cfg: MobileMoEConfig, ffn_ratio: int = 4) -> Arch:
    """Best-effort inverse of :meth:`Arch.to_config` (for presets and run tables that store configs)."""
    d = cfg.hidden_size
    common = dict(d_model=d, layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, ffn_ratio=ffn_ratio,
                  head_dim=cfg.head_dim, kv_heads=cfg.num_key_value_heads, heads=cfg.num_attention_heads,
                  tie_embeddings=cfg.tie_word_embeddings)
    d_ff = ffn_ratio * d
    if not cfg.is_moe:
        if cfg.intermediate_size_mlp % d_ff:
            raise SpaceError(f"dense FFN width {cfg.intermediate_size_mlp} is not a multiple of "
                             f"{ffn_ratio} x d_model ({d_ff}); pass ffn_ratio")
        k = cfg.intermediate_size_mlp // d_ff
        return Arch(E=k, k=k, **common)
    w = cfg.intermediate_size
    if d_ff % w:
        raise SpaceError(f"expert width {w} does not divide d_ff {d_ff}")
    g = d_ff // w
    s = cfg.intermediate_size_mlp // w if cfg.num_shared_experts else 0
    slots = cfg.num_local_experts + s
    active = cfg.num_experts_per_tok + s
    if slots % g or active % g:
        raise SpaceError(f"{cfg.num_local_experts} experts + {s} shared slots do not form whole coarse "
                         f"experts of granularity {g}")
    return Arch(E=slots // g, g=g, k=active // g, s=s, **common)


# ---------------------------------------------------------------------- accounting
@dataclass
class ArchStats:
    """An architecture with its exact accounting (all from :mod:`mobilemoe.accounting`)."""

    arch: Arch
    total_params: int
    active_params: float
    int4_bytes: int
    bf16_bytes: int
    decode_bytes_per_token: float  # INT4 weight bytes a decoder streams per token
    decode_flops_per_token: float  # at ``context`` positions
    prefill_flops_per_token: float  # mean over a ``prompt`` prefill
    kv_cache_bytes: int  # at ``context`` positions, bf16
    context: int = 2048
    prompt: int = 1024
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def int4_gib(self) -> float:
        return self.int4_bytes / 2**30

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("arch", "extra")}
        out["arch"] = self.arch.to_dict()
        out["label"] = self.arch.label()
        out["int4_gib"] = self.int4_gib
        out["e_law"] = self.arch.e_law
        out.update(self.extra)
        return out


def stats(arch: Arch, context: int = 2048, prompt: int = 1024) -> ArchStats:
    cfg = arch.to_config()
    return ArchStats(
        arch=arch,
        total_params=accounting.total_params(cfg),
        active_params=accounting.active_params(cfg),
        int4_bytes=accounting.weight_bytes(cfg, "int4"),
        bf16_bytes=accounting.weight_bytes(cfg, "bfloat16"),
        decode_bytes_per_token=accounting.decode_weight_bytes_per_token(cfg, "int4"),
        decode_flops_per_token=accounting.decode_flops_per_token(cfg, context),
        prefill_flops_per_token=accounting.prefill_flops(cfg, prompt) / prompt,
        kv_cache_bytes=accounting.kv_cache_bytes(cfg, context),
        context=context, prompt=prompt)


# ---------------------------------------------------------------------- enumeration
def rule_layers(d_model: int, aspect: float = ASPECT) -> int:
    """Depth of the published tiers' shape rule: ``ceil(d_model / 40)``."""
    return max(1, math.ceil(d_model / aspect))


@dataclass
class SpaceSpec:
    """A grid of architectures. ``layer_slack`` lets depth vary around the shape rule."""

    d_models: tuple[int, ...] = tuple(range(256, 2561, 64))
    layer_slack: tuple[int, ...] = (-2, -1, 0, 1, 2)
    experts: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 24, 32)  # coarse E (E == k gives dense)
    top_k: tuple[int, ...] = (1, 2, 4)  # coarse k
    granularity: tuple[int, ...] = (1, 2, 4, 8, 16)
    shared: tuple[str, ...] = ("none", "half")  # shared slots: none | half of the active slots
    vocab: int = DEFAULT_VOCAB
    aspect: float = ASPECT
    include_dense: bool = True

    def shared_slots(self, mode: str, k: int, g: int) -> int:
        if mode == "none":
            return 0
        if mode == "half":
            return (k * g) // 2 if k * g >= 2 else 0
        return int(mode)


def enumerate_space(spec: SpaceSpec | None = None) -> Iterator[Arch]:
    """Every valid, INT4-packable architecture of the grid (dense ones once per size)."""
    spec = spec or SpaceSpec()
    seen: set[Arch] = set()
    for d in spec.d_models:
        base_layers = rule_layers(d, spec.aspect)
        for slack in spec.layer_slack:
            layers = base_layers + slack
            if layers < 1:
                continue
            sizes = dict(d_model=d, layers=layers, vocab=spec.vocab)
            points: list[Arch] = []
            if spec.include_dense:
                points.append(Arch(E=1, k=1, **sizes))
            for E, k, g, mode in itertools.product(spec.experts, spec.top_k, spec.granularity, spec.shared):
                if E <= k:
                    continue
                s = spec.shared_slots(mode, k, g)
                if s >= k * g:
                    continue
                points.append(Arch(E=E, k=k, g=g, s=s, **sizes))
            for a in points:
                if a in seen:
                    continue
                seen.add(a)
                try:
                    a.check()
                except SpaceError:
                    continue
                if a.int4_ok():
                    yield a


def tier_arch(name: str) -> Arch:
    """The published tier ``mobilemoe-s/m/l`` as a design-space point (E8 g8 k1 s4)."""
    from mobilemoe.config import preset

    return arch_from_config(preset(name))


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        raise SpaceError(f"option '{name}': expected comma-separated integers, got {text!r}") from None


def unique(items: Iterable[Arch]) -> list[Arch]:
    return list(dict.fromkeys(items))
