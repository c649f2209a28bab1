"""Run a recipe: tokenizer, data, model, then each stage in order, chained through checkpoints.

Output layout (``OUT``)::

    OUT/tokenizer.json                 # the recipe's tokenizer (trained once, reused on resume)
    OUT/data/<key>/{train,val}/        # token shards (mobilemoe.data), built once
    OUT/<stage>/metrics.jsonl          # per-step / eval records
    OUT/<stage>/checkpoints/step-N/    # resumable checkpoints (model + train_state.pt)
    OUT/<stage>/final/                 # the stage's model: config.json + model.safetensors (+ tokenizer.json)
    OUT/qat/final-int4/                # qat stage: the packed INT4 checkpoint

A stage starts from ``--init`` (if given, for the first stage run), else from the previous stage's
``final/`` in the recipe, else (first stage) from a fresh random initialisation.

Nothing is lost silently: ``OUT`` is locked while the run writes it (a second ``train`` into the same
``OUT`` is refused naming the holder's pid); a stage whose directory already holds output is refused
unless ``resume`` (continue it; a finished stage is skipped) or ``force`` (delete the selected stages'
directories, and for a whole-chain run the trained tokenizer, then start over). A stage resumed
without any checkpoint yet starts over from an empty directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilemoe.errors import MobileMoEError
from mobilemoe.train.data import ByteTokenizer, TokenWindowSource, pack_documents
from mobilemoe.train.distributed import DistInfo, barrier, init_distributed
from mobilemoe.train.recipe import DataSpec, Recipe, RecipeError, StageSpec
from mobilemoe.train.trainer import FINAL_DIR, Trainer, find_checkpoints
from mobilemoe.utils import output_lock


@dataclass
class StageReport:
    stage: str
    out_dir: str
    final_dir: str | None
    steps: int
    skipped: bool = False  # already finished (resume of a chain)
    init: str | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    val_loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    nan_skips: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LoaderSource:
    """Adapts a ``mobilemoe.data`` loader (an iterator of ``(x, y[, mask])`` with state_dict) to BatchSource."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.loader)
        return batch[0], batch[1]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


# ---------------------------------------------------------------------- tokenizer and data
def _resolve(recipe: Recipe, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and recipe.source_path and not p.exists():
        cand = Path(recipe.source_path).parent / p
        if cand.exists():
            return cand
    return p


def _text_documents(recipe: Recipe, spec: DataSpec, split: str):
    """Documents of a text source for ``split`` ('train' or 'validation')."""
    if spec.source == "stdlib":
        from mobilemoe.data import stdlib_corpus

        corpus = stdlib_corpus(val_fraction=spec.val_fraction, include_tests=spec.include_tests,
                               limit=spec.limit_files)
        return corpus.documents(split), corpus.describe(split)
    from mobilemoe.data import iter_documents

    src = spec.source if spec.source.startswith("hf:") else str(_resolve(recipe, spec.source))
    every = round(1 / spec.val_fraction) if spec.val_fraction > 0 else 0

    def gen():
        for i, doc in enumerate(iter_documents(src, field=spec.field)):
            if spec.max_documents is not None and i >= spec.max_documents:
                break
            is_val = every > 0 and i % every == every - 1
            if is_val == (split == "validation"):
                yield doc

    return gen(), f"{src} {split} (every {every}th document held out)" if every else f"{src} {split}"


def _conversations(recipe: Recipe, spec: DataSpec) -> list:
    from mobilemoe.data import read_gsm8k, read_jsonl_chats

    path = _resolve(recipe, spec.source)
    if spec.format == "gsm8k":
        convs = list(read_gsm8k(path))
    else:
        convs = list(read_jsonl_chats(path, field=spec.field if spec.field != "text" else "messages"))
    if spec.max_documents is not None:
        convs = convs[:spec.max_documents]
    return convs


def prepare_tokenizer(recipe: Recipe, out_dir: Path, vocab_size: int):
    """The recipe's tokenizer: trained once into ``OUT/tokenizer.json`` and reused afterwards."""
    spec = recipe.data
    if spec.tokenizer == "byte":
        return ByteTokenizer()
    from mobilemoe.data import Tokenizer, train_bpe

    if spec.tokenizer != "train":
        return Tokenizer.load(_resolve(recipe, spec.tokenizer))
    path = out_dir / "tokenizer.json"
    if path.exists():
        return Tokenizer.load(path)
    if spec.format != "text":
        raise RecipeError("field 'data.tokenizer': 'train' needs text data at the recipe level "
                          "(give a tokenizer.json path for chat-only recipes)")
    docs, _ = _text_documents(recipe, spec, "train")
    tok = train_bpe(docs, vocab_size=spec.vocab_size or vocab_size)
    tok.save(path)
    return Tokenizer.load(path)


def _data_key(spec: DataSpec, tokenizer, seq_len: int) -> str:
    fp = getattr(tokenizer, "fingerprint", "byte")
    raw = repr((asdict(spec), fp, seq_len))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_sources(recipe: Recipe, stage: StageSpec, tokenizer, out_dir: Path, info: DistInfo, seed: int):
    """(train, validation-or-None) batch sources of one stage, sharded by rank."""
    spec = stage.data or recipe.data
    B, T = stage.micro_batch_size, stage.seq_len
    if spec.format in ("chat", "gsm8k"):
        from mobilemoe.data import SFTLoader

        if isinstance(tokenizer, ByteTokenizer):
            raise RecipeError("chat data needs a BPE tokenizer with chat markers (data.tokenizer 'train' or a path)")
        if stage.loss_on != "answers":
            raise RecipeError(f"stage {stage.name!r}: chat data trains on answers only; set loss_on: answers")
        from mobilemoe.data.chat_format import format_beside

        convs = _conversations(recipe, spec)
        n_val = int(len(convs) * spec.val_fraction)
        train, val = convs[:len(convs) - n_val], convs[len(convs) - n_val:]
        # a tokenizer from a checkpoint with a chat_template (an imported model): train with that template
        encoder = format_beside(tokenizer) or tokenizer
        make = lambda c, shuffle: LoaderSource(SFTLoader(c, encoder, B, T, seed=seed, rank=info.rank,  # noqa: E731
                                                         world_size=info.world_size, shuffle=shuffle))
        return make(train, True), (make(val, False) if val else None)
    if isinstance(tokenizer, ByteTokenizer):  # no shards: the corpus is small by construction
        docs, _ = _text_documents(recipe, spec, "train")
        train = TokenWindowSource(pack_documents(docs, tokenizer), T, B, seed, info.rank, info.world_size)
        vdocs, _ = _text_documents(recipe, spec, "validation")
        vtokens = pack_documents(vdocs, tokenizer)
        val = TokenWindowSource(vtokens, T, B, seed + 1, info.rank, info.world_size) if len(vtokens) > T + 2 else None
        return train, val
    from mobilemoe.data import PretrainLoader, shard_documents

    root = out_dir / "data" / _data_key(spec, tokenizer, T)
    sources = []
    for split, sub in (("train", "train"), ("validation", "val")):
        if split == "validation" and spec.val_fraction == 0:
            sources.append(None)
            continue
        if info.is_main:
            docs, desc = _text_documents(recipe, spec, split)
            shard_documents(docs, tokenizer, root / sub, source=desc, progress=False)
        barrier()
        loader = PretrainLoader(root / sub, B, T, seed=seed, rank=info.rank, world_size=info.world_size,
                                shuffle=split == "train")
        sources.append(LoaderSource(loader))
    return sources[0], sources[1]


# ---------------------------------------------------------------------- model
def build_model(recipe: Recipe, vocab_size: int | None = None):
    from mobilemoe.config import MobileMoEConfig, preset
    from mobilemoe.model import MobileMoEForCausalLM

    m = recipe.model
    if m.preset is not None:
        cfg = preset(m.preset, **m.overrides)
    else:
        cfg = MobileMoEConfig.from_json(_resolve(recipe, m.config))
        if m.overrides:
            cfg = cfg.replace(**m.overrides)
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise RecipeError(f"field 'model.overrides.vocab_size': the tokenizer has {vocab_size} ids but the "
                          f"model's vocab_size is {cfg.vocab_size}")
    torch.manual_seed(m.init_seed + recipe.seed)
    model = MobileMoEForCausalLM(cfg)
    model.reset_parameters(seed=m.init_seed + recipe.seed)
    return model


def _apply_qat(model, stage: StageSpec):
    try:
        from mobilemoe.quant.qat import prepare_qat
    except ImportError as exc:
        raise MobileMoEError(f"QAT not available: mobilemoe.quant.qat could not be imported ({exc})") from None
    return prepare_qat(model, activations=stage.qat_activations)


# ---------------------------------------------------------------------- the chain
def run_recipe(recipe: Recipe, out_dir: str | Path, stage: str | None = None, init: str | Path | None = None,
               resume: bool = False, max_steps: int | None = None, progress: bool = True,
               force: bool = False, device: str | None = None) -> list[StageReport]:
    """Run all stages of ``recipe`` (or only ``stage``) into ``out_dir``; see the module docstring.
    ``device`` (auto | cpu | cuda) overrides every stage's ``device`` (the ``--device`` flag)."""
    if resume and force:
        raise MobileMoEError("give at most one of --resume (continue) and --force (start over)")
    out = Path(out_dir)
    selected = recipe.stages if stage is None else [recipe.stage(stage)]
    if device is not None:
        for s in selected:
            s.device = device
    devices = {s.device for s in selected}
    if len(devices) > 1:  # one process group serves the whole chain
        raise RecipeError(f"field 'stages[*].device': the stages run ask for different devices {sorted(devices)}; "
                          "give them one device (or pass --device)")
    info = init_distributed(device=devices.pop())
    # rank 0 holds the lock for the whole run (a second writer is refused before it looks at OUT)
    with output_lock(out, "train") if info.is_main else contextlib.nullcontext():
        barrier()
        used = [out / s.name for s in selected if _has_output(out / s.name)]
        if used and not resume and not force:
            raise MobileMoEError(f"{used[0]} already holds a training run; pass --resume to continue it "
                                 "or --force to delete it and start over")
        if force and info.is_main:
            for sdir in used:
                shutil.rmtree(sdir)
            if stage is None:  # the whole chain starts over: retrain the tokenizer too
                (out / "tokenizer.json").unlink(missing_ok=True)
        barrier()
        return _run_stages(recipe, out, info, selected, init, resume, max_steps, progress)


def _has_output(sdir: Path) -> bool:
    return sdir.is_dir() and any(sdir.iterdir())


def _run_stages(recipe: Recipe, out: Path, info: DistInfo, selected: list[StageSpec], init: str | Path | None,
                resume: bool, max_steps: int | None, progress: bool) -> list[StageReport]:
    from mobilemoe.checkpoint import load_model

    names = [s.name for s in recipe.stages]
    base_vocab = build_model_config_vocab(recipe)
    tokenizer = None
    if info.is_main:
        init_tok = Path(init) / "tokenizer.json" if init is not None else None
        if recipe.data.tokenizer == "train" and init_tok is not None and init_tok.exists() \
                and not (out / "tokenizer.json").exists():
            shutil.copyfile(init_tok, out / "tokenizer.json")  # keep the tokenizer the init model was trained with
        tokenizer = prepare_tokenizer(recipe, out, base_vocab)
    barrier()
    if not info.is_main:
        tokenizer = prepare_tokenizer(recipe, out, base_vocab)

    reports: list[StageReport] = []
    prev: Path | None = Path(init) if init is not None else None
    for i, s in enumerate(selected):
        sdir = out / s.name
        if prev is None:
            idx = names.index(s.name)
            if idx > 0:
                prev_final = out / names[idx - 1] / FINAL_DIR
                if not (prev_final / "config.json").exists():
                    raise MobileMoEError(f"stage {s.name!r} starts from the {names[idx - 1]!r} stage's checkpoint "
                                         f"({prev_final}), which does not exist: run that stage first or pass --init CKPT")
                prev = prev_final
        if resume and (sdir / FINAL_DIR / "config.json").exists() and (sdir / FINAL_DIR / "train_summary.json").exists():
            reports.append(StageReport(s.name, str(sdir), str(sdir / FINAL_DIR), 0, skipped=True,
                                       init=str(prev) if prev else None))
            prev = sdir / FINAL_DIR
            continue
        if prev is not None:
            model = load_model(prev, dtype=torch.float32)
        else:
            model = build_model(recipe, getattr(tokenizer, "vocab_size", None))
        if getattr(tokenizer, "vocab_size", 0) > model.config.vocab_size:
            raise RecipeError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                              f"{model.config.vocab_size}")
        context = model.config.max_position_embeddings
        if s.seq_len > context:
            raise RecipeError(f"field 'stages[{names.index(s.name)}].seq_len': {s.seq_len} is longer than the "
                              f"model's context (max_position_embeddings {context} in {prev or 'model'})")
        if s.name == "qat":
            model = _apply_qat(model, s)
        seed = recipe.seed + s.seed
        train_src, val_src = build_sources(recipe, s, tokenizer, out, info, seed)
        steps = max_steps if max_steps is not None else (
            s.max_steps if s.max_steps is not None else math.ceil(s.tokens / s.tokens_per_step(info.world_size)))
        cfg = s.train_config(steps)
        cfg.seed, cfg.progress = seed, progress and cfg.progress
        cfg.strategy = (s.strategy if s.strategy != "none" else recipe.strategy) if info.enabled else "none"
        resume_stage = resume and bool(find_checkpoints(sdir))
        if not resume_stage and info.is_main and sdir.exists():
            shutil.rmtree(sdir)  # output of a run killed before its first checkpoint: start clean
        barrier()
        trainer = Trainer(model, cfg, train_src, val_src, out_dir=sdir, dist_info=info,
                          extra_state={"recipe": recipe.name, "stage": s.name, "init": str(prev) if prev else None})
        t0 = time.perf_counter()
        result = trainer.fit(resume=resume_stage)
        report = StageReport(s.name, str(sdir), str(result.final_dir) if result.final_dir else None, result.step,
                             init=str(prev) if prev else None, nan_skips=result.nan_skips,
                             seconds=time.perf_counter() - t0)
        done = [h for h in result.history if not h.get("skipped")]  # a skipped step's loss is NaN
        if done:
            report.loss_first, report.loss_last = done[0]["loss"], done[-1]["loss"]
        if result.history:
            report.tokens = sum(h["tokens"] for h in result.history)
        if result.evals:
            report.val_loss = result.evals[-1]["val_loss"]
        if info.is_main and result.final_dir is not None:
            tok_file = out / "tokenizer.json"
            if recipe.data.tokenizer not in ("train", "byte"):
                tok_file = _resolve(recipe, recipe.data.tokenizer)
                tok_file = tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file
            if tok_file.exists():
                shutil.copyfile(tok_file, result.final_dir / "tokenizer.json")
            if s.name == "qat" and s.export_int4:
                report.extra["int4_dir"] = _export_int4(result.final_dir, sdir / "final-int4")
        barrier()
        reports.append(report)
        prev = result.final_dir
    return reports


def build_model_config_vocab(recipe: Recipe) -> int:
    from mobilemoe.config import MobileMoEConfig, preset

    m = recipe.model
    if m.preset is not None:
        return preset(m.preset, **m.overrides).vocab_size
    cfg = MobileMoEConfig.from_json(_resolve(recipe, m.config))
    return int(m.overrides.get("vocab_size", cfg.vocab_size))


def _export_int4(final_dir: Path, out: Path) -> str:
    from mobilemoe.quant.convert import quantize_checkpoint

    quantize_checkpoint(final_dir, out, overwrite=True)
    return str(out)
