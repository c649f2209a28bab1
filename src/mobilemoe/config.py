"""The MobileMoE config: one dataclass that reads and writes the Hugging Face ``config.json``
contract of the released MobileMoE checkpoints (see ``shared/specs/mobilemoe-checkpoint.md``).

Field names and meanings follow that contract exactly so a released ``config.json`` loads
unchanged. Unknown fields are kept in :attr:`MobileMoEConfig.extra` and written back out.

Two fields are mobilemoe extensions so baselines share the code (both have defaults that
reproduce the released models, so released configs never need them):

* ``router_type``: ``"sigmoid"`` (MobileMoE / DeepSeek-V3 style) or ``"softmax"`` (Mixtral/Qwen style).
* ``num_shared_experts``: 1 (MobileMoE) or 0 (no shared expert, e.g. Mixtral/Qwen3-MoE shapes).

and one chooses the INT4 layout of models trained here (:mod:`mobilemoe.formats`):

* ``expert_quant_group_axis``: ``"out"`` (the released format, the default) or ``"in"``: the axis of
  the routed experts [E, in, out] that INT4 groups run along, in QAT, the converter and every reader
  of INT4 experts. ``"in"`` makes the whole model exact GGUF Q4_0; the native runtime runs only
  ``"out"``. An INT4 config records it in ``quantization.expert_group_axis`` (absent = ``"out"``);
  the two must agree.

A dense model is a config with ``num_local_experts == 0``: every layer is a SwiGLU FFN of width
``intermediate_size_mlp``.

Values are checked where they enter (:meth:`MobileMoEConfig.from_dict`, so every ``config.json``,
preset and ``replace``): the shape fields (:data:`REQUIRED_FIELDS`) must be present, integers are
real integers within :data:`INT_BOUNDS` (checked before anything is sized from them), floats are
finite and positive, booleans are JSON true/false. Each failure is one :class:`ConfigError` naming
the file and the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobilemoe.errors import MobileMoEError
from mobilemoe.formats import (
    DEFAULT_EXPERT_GROUP_AXIS,
    EXPERT_GROUP_AXES,
    EXPERT_GROUP_AXIS_FIELD,
    EXPERT_GROUP_AXIS_TEXT,
    GROUP_SIZE,
    INT4_FORMAT,
    INT4_QUANTIZATION_BLOCK,
    block_expert_axis,
)

QUANT_FORMAT_INT4 = INT4_FORMAT
KNOWN_QUANT_FORMATS = (QUANT_FORMAT_INT4,)

ROUTER_TYPES = ("sigmoid", "softmax")
TORCH_DTYPES = ("bfloat16", "float16", "float32")

# Integer fields: inclusive [low, high]. The upper bounds are far above any model this toolkit targets
# (the released L: 32 layers, d 1280, vocab 128256, 60 experts, context 8192) and low enough that a
# typo such as 1e9 layers fails here, before a single list or tensor is sized from it.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**21),
    "hidden_size": (1, 65536),
    "intermediate_size": (1, 2**18),
    "intermediate_size_mlp": (1, 2**18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 1024),
    "max_position_embeddings": (1, 2**20),
    "interleave_moe_layer_step": (1, 1024),
    "num_local_experts": (0, 4096),
    "num_experts_per_tok": (0, 4096),
    "num_shared_experts": (0, 1),
}
# Float fields: finite and in (0, high].
FLOAT_BOUNDS: dict[str, float] = {"rms_norm_eps": 1.0, "rope_theta": 1e12, "routed_scaling_factor": 1e3,
                                  "initializer_range": 10.0}
BOOL_FIELDS = ("use_qk_norm", "tie_word_embeddings", "attention_bias", "norm_topk_prob", "attn_temperature_tuning")
TOKEN_ID_MAX = 2**31 - 1
# A config.json must state the model's shape: a missing field would silently become MobileMoE-S's value.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size_mlp", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts")
REQUIRED_MOE_FIELDS = ("intermediate_size", "num_experts_per_tok")  # only MoE configs use them


class ConfigError(MobileMoEError, ValueError):
    """A config field is missing, of the wrong type, or inconsistent. The message names the field."""


MAX_JSON_BYTES = 64 * 1024**2  # config.json and safetensors indexes are kilobytes; refuse to slurp a huge file


def read_json_file(path: str | os.PathLike, error: type[Exception]) -> Any:
    """Parse a small JSON file; any failure (unreadable, too big, not UTF-8, not JSON) -> ``error`` naming it."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path}: {path.stat().st_size} bytes, larger than the {MAX_JSON_BYTES} a JSON "
                        f"config or index may be")
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON: nested too deeply") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None


def _err(source: str, name: str, expected: str, got: Any) -> ConfigError:
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}field '{name}': expected {expected}, got {got!r}")


def _is_int(value: Any) -> bool:
    """A real integer: bool is not one, nor is a float such as 1e9 (JSON keeps the two apart)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (NaN and inf pass ``value <= 0`` checks, so they are refused here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _token_id_ok(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= TOKEN_ID_MAX


@dataclass
class MobileMoEConfig:
    vocab_size: int = 128256
    hidden_size: int = 768
    intermediate_size: int = 384  # routed expert width
    intermediate_size_mlp: int = 1536  # shared expert width (and dense-layer FFN width)
    num_hidden_layers: int = 20
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    head_dim: int = 64
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    num_local_experts: int = 60
    num_experts_per_tok: int = 4
    interleave_moe_layer_step: int = 1
    no_rope_layers: list[int] | None = None  # Llama-4 convention: 1 = this layer USES RoPE
    use_qk_norm: bool = True
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    attn_temperature_tuning: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization: dict[str, Any] | None = None
    # mobilemoe extensions (defaults reproduce the released models)
    router_type: str = "sigmoid"
    num_shared_experts: int = 1
    expert_quant_group_axis: str = DEFAULT_EXPERT_GROUP_AXIS  # INT4 group axis of routed experts: out | in
    # everything else found in a config.json, kept verbatim
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "mobilemoe"
    architectures = ("MobileMoEForCausalLM",)

    def __post_init__(self) -> None:
        self._check_scalars("")  # before no_rope_layers is sized from num_hidden_layers
        if self.no_rope_layers is None:
            self.no_rope_layers = [1] * self.num_hidden_layers
        self.validate()

    # ------------------------------------------------------------------ derived layout
    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Llama-4 interleave convention: with step n, layers n-1, 2n-1, ... are MoE."""
        return self.is_moe and (layer + 1) % self.interleave_moe_layer_step == 0

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None

    # ------------------------------------------------------------------ validation
    def _check_scalars(self, source: str) -> None:
        """Type, finiteness and bounds of every scalar field (no other field is needed to check these)."""
        for name, (low, high) in INT_BOUNDS.items():
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                raise _err(source, name, f"an integer in [{low}, {high}]", value)
        for name, high in FLOAT_BOUNDS.items():
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value <= high:
                raise _err(source, name, f"a finite number in (0, {high:g}]", value)
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):  # the string "false" would otherwise read as true
                raise _err(source, name, "true or false", value)
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not _token_id_ok(value):
                raise _err(source, name, f"null or an integer in [0, {TOKEN_ID_MAX}]", value)
        eos = self.eos_token_id
        if eos is not None and not _token_id_ok(eos) and not (
                isinstance(eos, list) and eos and all(_token_id_ok(v) for v in eos)):
            raise _err(source, "eos_token_id", f"null, an integer in [0, {TOKEN_ID_MAX}] or a list of them", eos)
        if self.torch_dtype not in TORCH_DTYPES:
            raise _err(source, "torch_dtype", f"one of {list(TORCH_DTYPES)}", self.torch_dtype)
        if not isinstance(self.extra, dict):
            raise _err(source, "extra", "a dict", self.extra)

    def validate(self, source: str = "") -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        self._check_scalars(source)
        if self.hidden_act != "silu":
            raise _err(source, "hidden_act", "'silu'", self.hidden_act)
        if self.num_attention_heads % self.num_key_value_heads:
            raise _err(source, "num_key_value_heads",
                       f"a divisor of num_attention_heads ({self.num_attention_heads})",
                       self.num_key_value_heads)
        if self.head_dim % 2:
            raise _err(source, "head_dim", "an even number (RoPE rotates pairs)", self.head_dim)
        if self.is_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise _err(source, "num_experts_per_tok",
                           f"between 1 and num_local_experts ({self.num_local_experts})",
                           self.num_experts_per_tok)
            if self.intermediate_size_mlp % self.intermediate_size:
                raise _err(source, "intermediate_size_mlp",
                           f"a multiple of intermediate_size ({self.intermediate_size})",
                           self.intermediate_size_mlp)
        if self.num_shared_experts > 1:
            raise _err(source, "num_shared_experts", "0 or 1", self.num_shared_experts)
        if self.router_type not in ROUTER_TYPES:
            raise _err(source, "router_type", f"one of {ROUTER_TYPES}", self.router_type)
        if self.expert_quant_group_axis not in EXPERT_GROUP_AXES:
            raise _err(source, EXPERT_GROUP_AXIS_FIELD, f"one of {list(EXPERT_GROUP_AXES)}",
                       self.expert_quant_group_axis)
        if not isinstance(self.no_rope_layers, list) or len(self.no_rope_layers) != self.num_hidden_layers:
            got = len(self.no_rope_layers) if isinstance(self.no_rope_layers, list) else self.no_rope_layers
            raise _err(source, "no_rope_layers",
                       f"a list of num_hidden_layers ({self.num_hidden_layers}) entries of 0/1",
                       f"length {got}" if isinstance(got, int) else got)
        if any(not _is_int(v) or v not in (0, 1) for v in self.no_rope_layers):
            raise _err(source, "no_rope_layers", "entries 0 or 1", self.no_rope_layers)
        layer_types = self.extra.get("layer_types")
        if layer_types is not None and (not isinstance(layer_types, list)
                                        or len(layer_types) != self.num_hidden_layers):
            raise _err(source, "layer_types", f"a list of {self.num_hidden_layers} entries", layer_types)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise _err(source, "layer_types", "only 'full_attention' layers (supported here)", layer_types)
        if self.attn_temperature_tuning:
            raise _err(source, "attn_temperature_tuning", "false (not supported)", True)
        self._validate_rope_scaling(source)
        self._validate_quantization(source)

    def _validate_rope_scaling(self, source: str) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise _err(source, "rope_scaling", "an object or null", rs)
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "llama3":
            raise _err(source, "rope_scaling.rope_type", "'llama3'", kind)
        for key in ["factor", "low_freq_factor", "high_freq_factor"]:
            value = rs.get(key)
            if not _is_number(value) or not 0 < value <= 1e4:
                raise _err(source, f"rope_scaling.{key}", "a finite number in (0, 1e4]", value)
        original = rs.get("original_max_position_embeddings")
        if not _is_int(original) or not 1 <= original <= INT_BOUNDS["max_position_embeddings"][1]:
            raise _err(source, "rope_scaling.original_max_position_embeddings",
                       f"an integer in [1, {INT_BOUNDS['max_position_embeddings'][1]}]", original)
        if rs["high_freq_factor"] < rs["low_freq_factor"]:
            raise _err(source, "rope_scaling.high_freq_factor",
                       f">= low_freq_factor ({rs['low_freq_factor']})", rs["high_freq_factor"])

    def _validate_quantization(self, source: str) -> None:
        q = self.quantization
        if q is None:
            return
        if not isinstance(q, dict):
            raise _err(source, "quantization", "an object or null", q)
        fmt = q.get("format")
        if fmt not in KNOWN_QUANT_FORMATS:
            raise _err(source, "quantization.format", f"one of {list(KNOWN_QUANT_FORMATS)}", fmt)
        for key in ["group_size", "embedding_group_size", "qmin", "qmax", "symmetric", "packed"]:
            expected = INT4_QUANTIZATION_BLOCK[key]
            # type too: True == 1 in Python, but `"packed": 1` is not the released block
            if key in q and (type(q[key]) is not type(expected) or q[key] != expected):
                raise _err(source, f"quantization.{key}", f"{expected!r} for {fmt}", q[key])
        scale_dtype = INT4_QUANTIZATION_BLOCK["scale_dtype"]
        if q.get("scale_dtype", scale_dtype) != scale_dtype:
            raise _err(source, "quantization.scale_dtype", repr(scale_dtype), q.get("scale_dtype"))
        axis = block_expert_axis(q)  # a value we cannot read would misplace every expert code: refuse it
        if axis is None:
            raise _err(source, "quantization.expert_group_axis", f"one of {list(EXPERT_GROUP_AXIS_TEXT.values())}",
                       q.get("expert_group_axis"))
        if axis != self.expert_quant_group_axis:
            raise _err(source, EXPERT_GROUP_AXIS_FIELD, f"{axis!r}, the axis quantization.expert_group_axis "
                       f"records", self.expert_quant_group_axis)
        # Every packed axis must split into whole groups.
        grouped = {"hidden_size": self.hidden_size, "intermediate_size_mlp": self.intermediate_size_mlp,
                   "head_dim * num_attention_heads": self.head_dim * self.num_attention_heads}
        if self.is_moe:
            grouped["intermediate_size"] = self.intermediate_size
        for name, value in grouped.items():
            if value % GROUP_SIZE:
                raise _err(source, name, f"a multiple of {GROUP_SIZE} for group-{GROUP_SIZE} INT4", value)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": self.model_type, "architectures": list(self.architectures)}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "quantization" and value is None:
                continue  # a missing block means a BF16 checkpoint
            if f.name == EXPERT_GROUP_AXIS_FIELD and value == DEFAULT_EXPERT_GROUP_AXIS:
                continue  # the released layout: written only when it differs
            out[f.name] = copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> "MobileMoEConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source or 'config'}: expected a JSON object, got {type(data).__name__}")
        data = copy.deepcopy(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise _err(source, "model_type", f"'{cls.model_type}'", model_type)
        data.pop("architectures", None)
        if "quantization_config" in data and "quantization" not in data:
            raise _err(source, "quantization_config",
                       "the MobileMoE contract's key 'quantization' (not 'quantization_config')",
                       data["quantization_config"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        required = list(REQUIRED_FIELDS)
        if known.get("num_local_experts") != 0:
            required += REQUIRED_MOE_FIELDS
        missing = [name for name in required if name not in known]
        if missing:
            fields = ", ".join(f"'{name}'" for name in missing)
            raise ConfigError(f"{source or 'config'}: missing required field(s) {fields} "
                              f"(the model's shape is never guessed)")
        extra = {k: v for k, v in data.items() if k not in names}
        q = known.get("quantization")
        if EXPERT_GROUP_AXIS_FIELD not in known and isinstance(q, dict) and block_expert_axis(q) is not None:
            known[EXPERT_GROUP_AXIS_FIELD] = block_expert_axis(q)  # the block alone says it
        for f in dataclasses.fields(cls):
            if f.name in known and f.type in ("int", "float", "bool") and known[f.name] is None:
                raise _err(source, f.name, f"a {f.type}", None)
        try:
            cfg = cls.__new__(cls)
            for f in dataclasses.fields(cls):
                if f.name in known:
                    setattr(cfg, f.name, known[f.name])
                elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    setattr(cfg, f.name, f.default_factory())  # type: ignore[misc]
                else:
                    setattr(cfg, f.name, f.default)
            cfg.extra = extra
            if _is_int(cfg.rms_norm_eps):
                cfg.rms_norm_eps = float(cfg.rms_norm_eps)
            cfg._check_scalars(source)  # before no_rope_layers is sized from num_hidden_layers
            if cfg.no_rope_layers is None:
                cfg.no_rope_layers = [1] * cfg.num_hidden_layers
            cfg.validate(source)
        except TypeError as exc:  # e.g. comparing a string to an int
            raise ConfigError(f"{source or 'config'}: a field has the wrong type: {exc}") from None
        return cfg

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically (temp file + rename)."""
        from mobilemoe.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MobileMoEConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        return cls.from_dict(read_json_file(path, ConfigError), source=str(path))

    def replace(self, **changes: Any) -> "MobileMoEConfig":
        """A copy with some fields changed (validated)."""
        data = self.to_dict()
        data.update(changes)
        if "num_hidden_layers" in changes and "no_rope_layers" not in changes:
            data["no_rope_layers"] = None  # from_dict sizes it once the layer count is validated
            data.pop("layer_types", None)
        return MobileMoEConfig.from_dict(data)


# ---------------------------------------------------------------------- presets
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 8192,
                       "low_freq_factor": 1.0, "high_freq_factor": 1.0}


def _tier(layers: int, hidden: int, heads: int, routed: int, shared: int) -> dict[str, Any]:
    return dict(vocab_size=128256, hidden_size=hidden, intermediate_size=routed,
                intermediate_size_mlp=shared, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=4, head_dim=64, max_position_embeddings=8192, rope_theta=500000.0,
                rope_scaling=dict(LLAMA3_ROPE_SCALING), num_local_experts=60, num_experts_per_tok=4,
                routed_scaling_factor=2.5, bos_token_id=128000,
                eos_token_id=[128001, 128008, 128009])


PRESETS: dict[str, dict[str, Any]] = {
    # Published tiers. S and L match the released configs; M's dimensions are inferred
    # (the public loaders do not confirm them): 26 layers, d 1024, 16/4 heads, 60 x 512, shared 2048.
    "mobilemoe-s": _tier(20, 768, 12, 384, 1536),
    "mobilemoe-m": _tier(26, 1024, 16, 512, 2048),
    "mobilemoe-l": _tier(32, 1280, 20, 640, 2560),
    # Dense baseline shaped like MobileLLM-Pro (~1.08B params).
    "mobilellm-pro-like": dict(vocab_size=202048, hidden_size=1280, intermediate_size=6144,
                               intermediate_size_mlp=6144, num_hidden_layers=30, num_attention_heads=20,
                               num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
                               rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING),
                               num_local_experts=0, num_experts_per_tok=0, routed_scaling_factor=1.0),
    # Tiny presets for tests and CPU training (a few million parameters).
    "tiny-moe": dict(vocab_size=512, hidden_size=128, intermediate_size=64, intermediate_size_mlp=128,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=512, rope_theta=10000.0, num_local_experts=16,
                     num_experts_per_tok=4, routed_scaling_factor=2.5),
    "tiny-dense": dict(vocab_size=512, hidden_size=128, intermediate_size=384, intermediate_size_mlp=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=512, rope_theta=10000.0, num_local_experts=0,
                       num_experts_per_tok=0, routed_scaling_factor=1.0),
    "tiny-moe-softmax": dict(vocab_size=512, hidden_size=128, intermediate_size=64,
                             intermediate_size_mlp=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                             rope_theta=10000.0, num_local_experts=8, num_experts_per_tok=2,
                             routed_scaling_factor=1.0, router_type="softmax", num_shared_experts=0,
                             tie_word_embeddings=False, use_qk_norm=False),
}


def preset(name: str, **overrides: Any) -> MobileMoEConfig:
    """A named preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    data = dict(PRESETS[name])
    data.update(overrides)
    return MobileMoEConfig.from_dict(data, source=f"preset {name}")


def load_config(preset_name: str | None = None, path: str | os.PathLike | None = None) -> MobileMoEConfig:
    """Resolve a ``--preset NAME`` or ``--config PATH`` pair (exactly one must be given)."""
    if (preset_name is None) == (path is None):
        raise ConfigError("give exactly one of a preset name or a config path")
    return preset(preset_name) if preset_name is not None else MobileMoEConfig.from_json(path)
