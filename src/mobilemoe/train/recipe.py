"""Training recipes: a YAML file -> checked dataclasses.

A recipe names a model, its data, and one or more stages (``pretrain``, ``midtrain``, ``sft``,
``qat``) run in order, each starting from the previous stage's final checkpoint::

    name: tiny
    seed: 0
    model: {preset: tiny-moe, overrides: {vocab_size: 512}}
    data: {source: stdlib, tokenizer: train, vocab_size: 512, limit_files: 60}
    stages:
      - name: pretrain
        seq_len: 128
        micro_batch_size: 8
        max_steps: 300
        lr: 3.0e-3
        schedule: cosine

Every mapping is checked against its dataclass: an unknown field or a value of the wrong type is a
:class:`RecipeError` that names the field by its path (``stages[1].lr``). Stage fields are the
:class:`~mobilemoe.train.trainer.TrainConfig` fields plus the stage-only ones of :class:`StageSpec`.
Numbers must be finite (``.nan``/``.inf`` are refused), integers integral, booleans true/false, and
``model.overrides`` may only name :class:`~mobilemoe.config.MobileMoEConfig` fields; a preset model's
config is built at load time, so a bad override or a ``seq_len`` past its context is caught before
any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from mobilemoe.errors import MobileMoEError
from mobilemoe.train.trainer import TrainConfig
from mobilemoe.utils import read_yaml

STAGE_KINDS = ("pretrain", "midtrain", "sft", "qat")
DATA_FORMATS = ("text", "chat", "gsm8k")


class RecipeError(MobileMoEError, ValueError):
    """A recipe file is malformed; the message names the field (``stages[0].lr``)."""


@dataclass
class ModelSpec:
    preset: str | None = None  # a mobilemoe.config preset name ...
    config: str | None = None  # ... or a config.json path (relative to the recipe file)
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields to change
    init_seed: int = 0  # seed of the random initialisation of the first stage


@dataclass
class DataSpec:
    # "stdlib" (the embedded Python-stdlib corpus), a file/dir (.txt, .jsonl, .parquet, dir of .py),
    # or "hf:NAME[:CONFIG]"; for chat/gsm8k formats a .jsonl of conversations / GSM8K lines.
    source: str = "stdlib"
    format: str = "text"  # text (pretraining documents) | chat ({"messages": [...]}) | gsm8k ({question, answer})
    field: str = "text"  # jsonl/parquet field (chat: the messages field, default "messages")
    # "train" (BPE trained on the training split, vocab_size ids), "byte" (UTF-8 bytes, 257 ids),
    # or a tokenizer.json path (e.g. Llama 3's for the paper-scale recipes)
    tokenizer: str = "train"
    vocab_size: int | None = None  # tokenizer "train": defaults to the model's vocab_size
    val_fraction: float = 0.02  # held-out share (stdlib: by file; other sources: by document)
    limit_files: int | None = None  # stdlib: only the first N files (tiny runs)
    max_documents: int | None = None  # other sources: only the first N documents
    include_tests: bool = False  # stdlib: also the test directories


@dataclass
class StageSpec(TrainConfig):
    """One stage: every TrainConfig field plus these. ``max_steps`` or ``tokens`` sets the length."""

    name: str = "pretrain"  # pretrain | midtrain | sft | qat (also the stage's output sub-directory)
    seq_len: int = 2048
    micro_batch_size: int = 8  # sequences per process per micro-batch
    max_steps: int | None = None  # type: ignore[assignment]  # None: derived from tokens
    tokens: int | str | None = None  # token budget; an int sets max_steps, a string documents it ("unknown")
    data: DataSpec | None = None  # overrides the recipe's data for this stage
    loss_on: str = "all"  # all | answers (sft: loss only on assistant tokens; needs a chat/gsm8k format)
    seed: int = 0  # added to the recipe's seed for this stage
    qat_activations: str = "none"  # qat stage: none (4w) | int8 (8da4w)
    qat_group_size: int = 32  # qat stage: INT4 group size (the released format is 32)
    export_int4: bool = True  # qat stage: also write the packed INT4 checkpoint (final-int4/)
    notes: str = ""  # free text (paper references, budgets)

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum * world_size

    def train_config(self, max_steps: int) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: getattr(self, k) for k in names}
        values["max_steps"] = max_steps
        values["betas"] = tuple(values["betas"])
        return TrainConfig(**values)


@dataclass
class Recipe:
    name: str = "recipe"
    description: str = ""
    seed: int = 0
    strategy: str = "ddp"  # data parallelism under torchrun: ddp | fsdp
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stages: list[StageSpec] = field(default_factory=list)
    source_path: str | None = None  # set by load_recipe (not a YAML field)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(f"recipe {self.name!r} has no stage {name!r}; it has {[s.name for s in self.stages]}")


# ---------------------------------------------------------------------- checked construction
_NOT_YAML = {"source_path"}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursing into dataclasses/lists/dicts)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else
                          f"field '{where}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"field '{where}': expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"field '{where}': expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"field '{where}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"field '{where}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"field '{where}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "4e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"field '{where}': expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan / .inf would train silently into NaN weights
            raise RecipeError(f"field '{where}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"field '{where}': expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown fields and wrong types by name."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise RecipeError(f"field '{label}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_YAML}
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RecipeError(f"unknown field '{name}' (known fields of {label}: {', '.join(sorted(fields))})")
    values = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**values)


def _check(recipe: Recipe) -> None:
    from mobilemoe.train.distributed import STRATEGIES

    if recipe.strategy not in ("ddp", "fsdp"):
        raise RecipeError(f"field 'strategy': expected 'ddp' or 'fsdp', got {recipe.strategy!r}")
    m = recipe.model
    if (m.preset is None) == (m.config is None):
        raise RecipeError("field 'model': give exactly one of 'model.preset' or 'model.config'")
    if not recipe.stages:
        raise RecipeError("field 'stages': a recipe needs at least one stage")
    context = _check_model(m)
    seen = set()
    for i, s in enumerate(recipe.stages):
        at = f"stages[{i}]"
        if s.name not in STAGE_KINDS:
            raise RecipeError(f"field '{at}.name': expected one of {STAGE_KINDS}, got {s.name!r}")
        if s.name in seen:
            raise RecipeError(f"field '{at}.name': stage {s.name!r} appears twice")
        seen.add(s.name)
        if s.max_steps is None and not isinstance(s.tokens, int):
            raise RecipeError(f"field '{at}.max_steps': set max_steps, or tokens to an integer budget")
        if s.loss_on not in ("all", "answers"):
            raise RecipeError(f"field '{at}.loss_on': expected 'all' or 'answers', got {s.loss_on!r}")
        data = s.data or recipe.data
        if data.tokenizer != recipe.data.tokenizer:
            raise RecipeError(f"field '{at}.data.tokenizer': every stage must use the recipe's tokenizer "
                              f"({recipe.data.tokenizer!r}), got {data.tokenizer!r}")
        if s.loss_on == "answers" and data.format == "text":
            raise RecipeError(f"field '{at}.loss_on': 'answers' needs chat data (data.format chat or gsm8k)")
        if s.qat_activations not in ("none", "int8"):
            raise RecipeError(f"field '{at}.qat_activations': expected 'none' or 'int8', got {s.qat_activations!r}")
        if s.qat_group_size != 32:
            raise RecipeError(f"field '{at}.qat_group_size': only 32 (the mobilemoe-int4-g32 format) is supported")
        if s.strategy not in STRATEGIES:
            raise RecipeError(f"field '{at}.strategy': expected one of {STRATEGIES}, got {s.strategy!r}")
        for name in ("seq_len", "micro_batch_size"):
            if getattr(s, name) < 1:
                raise RecipeError(f"field '{at}.{name}': expected a positive integer, got {getattr(s, name)!r}")
        if context is not None and s.seq_len > context:
            raise RecipeError(f"field '{at}.seq_len': {s.seq_len} is longer than the model's context "
                              f"(max_position_embeddings {context})")
        if isinstance(s.tokens, int) and s.tokens < 1:
            raise RecipeError(f"field '{at}.tokens': expected a positive integer budget, got {s.tokens!r}")
        try:
            s.train_config(s.max_steps or 1).validate()
        except MobileMoEError as exc:
            raise RecipeError(str(exc).replace("field '", f"field '{at}.", 1)) from None
    for where, d in [("data", recipe.data)] + [(f"stages[{i}].data", s.data) for i, s in enumerate(recipe.stages)]:
        if d is None:
            continue
        if d.format not in DATA_FORMATS:
            raise RecipeError(f"field '{where}.format': expected one of {DATA_FORMATS}, got {d.format!r}")
        if not 0.0 <= d.val_fraction < 1.0:
            raise RecipeError(f"field '{where}.val_fraction': expected a number in [0, 1), got {d.val_fraction!r}")


def _check_model(m: ModelSpec) -> int | None:
    """Check ``model.overrides`` names real config fields; for a preset, build the config (bad
    values fail here, naming the field) and return its context length (None for a config path,
    which is checked when the run loads it)."""
    from mobilemoe.config import MobileMoEConfig, preset

    known = {f.name for f in dataclasses.fields(MobileMoEConfig)} - {"extra"}
    for key in m.overrides:
        if key not in known:  # MobileMoEConfig keeps unknown keys as HF extras: a typo would be ignored
            raise RecipeError(f"unknown field 'model.overrides.{key}' (not a MobileMoEConfig field; "
                              f"known: {', '.join(sorted(known))})")
    if m.preset is None:
        return None
    try:
        return preset(m.preset, **m.overrides).max_position_embeddings
    except MobileMoEError as exc:
        raise RecipeError(f"field 'model': {exc}") from None


def recipe_from_dict(data: Any, source: str = "") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source or 'recipe'}: expected a YAML mapping at the top level")
    try:
        recipe = from_dict(Recipe, data)
        _check(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}" if source else str(exc)) from None
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe YAML file."""
    path = Path(path)
    data = read_yaml(path, RecipeError, "recipe")
    recipe = recipe_from_dict(data, source=str(path))
    recipe.source_path = str(path)
    return recipe
