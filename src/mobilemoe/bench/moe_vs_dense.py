"""MoE vs dense at comparable INT4 memory: TTFT, prefill and decode speed, peak RSS, ceilings.

Each (model, runtime) pair lives in its own worker process (so its peak RSS is its own) and is
loaded once; measurements then alternate between the workers, context by context, for several
repetitions, and the medians are reported. Every ratio is taken between numbers of the same run.

Per context c: TTFT = time to prefill c random tokens into an empty cache; decode = tokens/s of
``decode_tokens`` single-token steps right after that prefill (so at context c).

A llama.cpp worker that fails or dies (e.g. SIGILL in a matmul this CPU cannot run) ends only the
llama.cpp side: the report keeps the mobilemoe numbers and says ``"llama_cpp": {"error": "..."}``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobilemoe import accounting
from mobilemoe.bench.llamacpp import LlamaCppCrash, exit_description
from mobilemoe.config import PRESETS, MobileMoEConfig, preset
from mobilemoe.errors import MobileMoEError

MOBILEMOE, LLAMA_CPP = "mobilemoe", "llama_cpp"


@dataclass
class BenchConfig:
    """One sweep's settings. These defaults are the only ones: ``mobilemoe bench`` and
    ``benchmarks/moe_vs_dense.py`` both read their CLI defaults from here."""

    moe: str = "mobilemoe-s"
    dense: str = "mobilellm-pro-like"
    contexts: list[int] = field(default_factory=lambda: [256, 1024, 2048, 4096])
    # 5 repeats x 64 steps: with 3 x 32 (a fraction of a second of MoE-S decode per sample) one
    # bandwidth burst of a shared machine moved the median (BENCHMARKS.md, the runtime sweep).
    decode_tokens: int = 64
    repeats: int = 5
    threads: int = 2
    with_llama_cpp: bool = False
    backend: str = "auto"
    cache_dir: str = "runs/bench-models"
    seed: int = 0


def model_config(name: str) -> MobileMoEConfig:
    """A preset's config, or (a name that is no preset) the config.json of that checkpoint directory,
    so a sweep can time a real checkpoint (``python -m mobilemoe.bench.device --model CKPT``)."""
    if name in PRESETS:
        return preset(name)
    if not (Path(name) / "config.json").is_file():
        return preset(name)  # raises the unknown-preset error, which lists the presets
    return MobileMoEConfig.from_json(Path(name) / "config.json")


def _kernel_info(engine) -> dict[str, Any]:
    """Which backend and kernel ISA this worker's model runs on (read in the worker: it is what ran)."""
    from mobilemoe import kernels

    backend = type(engine.backend).__name__
    native = backend == "NativeBackend" and kernels.is_available()
    if not native:
        return {"backend": backend, "kernel_isa": None}
    # paths: which kernel each op family runs (e.g. prefill_attention amx-bf16 / avx512bf16 / sdpa)
    return {"backend": backend, "kernel_isa": kernels.active_isa(),
            "kernel_paths": dict(engine.backend.model.kernel_paths())}


# ---------------------------------------------------------------------- workers
def _worker(conn, runtime: str, path: str, max_ctx: int, threads: int, backend: str, seed: int) -> None:
    """Load one model, then answer ("measure", ctx, n) / ("rss",) / ("stop",) requests."""
    import time

    import numpy as np
    import torch

    from mobilemoe.bench.system import peak_rss_bytes

    torch.set_num_threads(threads)
    rss_before_load = peak_rss_bytes()
    try:
        if runtime == MOBILEMOE:
            from mobilemoe.runtime import Engine

            engine = Engine.load(path, max_seq_len=max_ctx, backend=backend)
            vocab = engine.config.vocab_size
            kernel_info = _kernel_info(engine)

            def measure(ctx: int, n: int) -> tuple[float, float]:
                ids = rng.integers(0, vocab, ctx).tolist()
                engine.reset()
                t0 = time.perf_counter()
                engine.prefill(ids)
                ttft = time.perf_counter() - t0
                toks = rng.integers(0, vocab, n).tolist()
                t0 = time.perf_counter()
                for tok in toks:
                    engine.decode(tok)
                return ttft, time.perf_counter() - t0
        else:
            from mobilemoe.bench.llamacpp import LlamaCppModel

            model = LlamaCppModel(path, n_ctx=max_ctx, threads=threads, seed=seed)
            kernel_info = {"backend": "llama.cpp", "kernel_isa": None}

            def measure(ctx: int, n: int) -> tuple[float, float]:
                model.clear()
                ttft = model.prefill(model.random_ids(ctx))
                return ttft, model.decode(n)
        rng = np.random.default_rng(seed)
        conn.send(("ready", {"rss_before_load": rss_before_load, "rss_after_load": peak_rss_bytes(),
                             "kernels": kernel_info}))
    except Exception as exc:  # report load failures to the parent instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "rss":
            conn.send(("rss", peak_rss_bytes()))
        elif msg[0] == "measure":
            try:
                conn.send(("measure", measure(msg[1], msg[2])))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Worker:
    def __init__(self, name: str, runtime: str, path: Path, max_ctx: int, cfg: BenchConfig) -> None:
        ctx = mp.get_context("spawn")
        self.name, self.runtime = name, runtime
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, runtime, str(path), max_ctx, cfg.threads,
                                                      cfg.backend, cfg.seed), daemon=True)
        self.proc.start()
        child.close()  # the parent's copy would keep the pipe open after the worker dies
        self.load_info = self._ask(None, "ready", "loading")
        self.kernel_info = self.load_info.pop("kernels")

    def _ask(self, msg: tuple | None, kind: str, doing: str) -> Any:
        """Send ``msg`` (None: nothing), return the payload of the ``kind`` answer."""
        try:
            if msg is not None:
                self.conn.send(msg)
            tag, payload = self.conn.recv()
        except (EOFError, OSError):  # the worker died without answering
            self.proc.join(timeout=30)
            how = exit_description(self.proc.exitcode if self.proc.exitcode is not None else 0)
            if self.runtime == LLAMA_CPP:
                raise LlamaCppCrash(f"llama.cpp crashed ({how}) while {doing} {self.name}") from None
            raise MobileMoEError(f"{self.runtime} worker for {self.name} died ({how}) while {doing}") from None
        if tag == "error":
            raise MobileMoEError(f"{self.runtime} worker for {self.name}: {payload}")
        assert tag == kind, (tag, kind)
        return payload

    def measure(self, ctx: int, n: int) -> tuple[float, float]:
        return self._ask(("measure", ctx, n), "measure", f"timing context {ctx} of")

    def peak_rss(self) -> int:
        return self._ask(("rss",), "rss", "reporting the peak RSS of")

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:  # already dead
            pass
        self.proc.join(timeout=30)


# ---------------------------------------------------------------------- model files
def prepare_models(cfg: BenchConfig) -> dict[tuple[str, str], Path]:
    """Random INT4 checkpoints (and GGUFs with --with-llama-cpp), cached under cache_dir; a name that
    is a checkpoint directory rather than a preset is timed as it is."""
    from mobilemoe.bench.random_int4 import write_random_int4_checkpoint

    root = Path(cfg.cache_dir)
    paths = {}
    for role, name in (("moe", cfg.moe), ("dense", cfg.dense)):
        if name not in PRESETS:
            model_config(name)  # a clear error for a name that is neither a preset nor a checkpoint
            if cfg.with_llama_cpp:
                raise MobileMoEError(f"{name}: --with-llama-cpp times random GGUFs of presets, not a checkpoint")
            paths[(role, MOBILEMOE)] = Path(name)
            continue
        paths[(role, MOBILEMOE)] = write_random_int4_checkpoint(preset(name), root / f"{name}-int4", cfg.seed)
        if cfg.with_llama_cpp:
            from mobilemoe.bench.gguf_random import write_random_gguf

            gguf = root / f"{name}-q4_0.gguf"
            if not gguf.exists():
                write_random_gguf(preset(name), gguf, cfg.seed)
            paths[(role, LLAMA_CPP)] = gguf
    return paths


# ---------------------------------------------------------------------- analysis
def ceilings(cfg: BenchConfig, ctx: int, kv_dtype_bytes: int = 2) -> dict[str, float]:
    """Ratios the accounting allows: decode by bytes read per token, prefill by FLOPs."""
    moe, dense = model_config(cfg.moe), model_config(cfg.dense)

    def decode_bytes(c):
        return accounting.decode_weight_bytes_per_token(c) + accounting.kv_cache_bytes(c, ctx, kv_dtype_bytes)

    return {
        "decode_ceiling": decode_bytes(dense) / decode_bytes(moe),
        "prefill_ceiling": accounting.prefill_flops(dense, ctx) / accounting.prefill_flops(moe, ctx),
        "moe_decode_bytes_per_token": decode_bytes(moe),
        "dense_decode_bytes_per_token": decode_bytes(dense),
    }


def summarize(cfg: BenchConfig, samples: dict, rss: dict, bandwidth_gbs: float) -> dict[str, Any]:
    """samples[(role, runtime)][ctx] = list of (ttft_s, decode_s) -> the report's flat keys."""
    report: dict[str, Any] = {}
    for runtime in sorted({rt for _, rt in samples}):
        out: dict[str, Any] = {}
        for ctx in cfg.contexts:
            for role in ("moe", "dense"):
                runs = samples[(role, runtime)][ctx]
                ttft = statistics.median(r[0] for r in runs)
                decode = statistics.median(r[1] for r in runs)
                out[f"{role}_ttft_s_{ctx}"] = ttft
                out[f"{role}_prefill_tok_s_{ctx}"] = ctx / ttft
                out[f"{role}_decode_tok_s_{ctx}"] = cfg.decode_tokens / decode
            out[f"decode_speedup_{ctx}"] = out[f"moe_decode_tok_s_{ctx}"] / out[f"dense_decode_tok_s_{ctx}"]
            out[f"prefill_speedup_{ctx}"] = out[f"moe_prefill_tok_s_{ctx}"] / out[f"dense_prefill_tok_s_{ctx}"]
        for role in ("moe", "dense"):
            out[f"{role}_peak_rss_bytes"] = rss[(role, runtime)]
        report[runtime] = out
    report["ceilings"] = {}
    for ctx in cfg.contexts:
        c = ceilings(cfg, ctx)
        c["moe_roofline_decode_tok_s"] = bandwidth_gbs * 1e9 / c["moe_decode_bytes_per_token"]
        c["dense_roofline_decode_tok_s"] = bandwidth_gbs * 1e9 / c["dense_decode_bytes_per_token"]
        report["ceilings"][str(ctx)] = c
    return report


def flat_keys(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's headline keys at top level (mobilemoe runtime), llama.cpp under ``llama_cpp``."""
    ours = report.get(MOBILEMOE, {})
    out = dict(ours)
    if LLAMA_CPP in report:
        out["llama_cpp"] = report[LLAMA_CPP]
    return out


# ---------------------------------------------------------------------- driver
def run(cfg: BenchConfig, progress: bool = True, bandwidth_bytes: int | None = None) -> dict[str, Any]:
    """The sweep. ``bandwidth_bytes``: working set of the DRAM read probe (None: its 1 GiB default;
    a quick run passes less)."""
    from tqdm import tqdm

    from mobilemoe.bench.system import dram_read_bandwidth_gbs, machine_info

    bandwidth = dram_read_bandwidth_gbs() if bandwidth_bytes is None else dram_read_bandwidth_gbs(bandwidth_bytes)
    paths = prepare_models(cfg)
    max_ctx = max(cfg.contexts) + cfg.decode_tokens + 8
    workers: dict[tuple[str, str], Worker] = {}
    llama_error: str | None = None

    def drop_llama_cpp(exc: MobileMoEError) -> None:
        """A llama.cpp failure ends the llama.cpp side only; a mobilemoe failure ends the run."""
        nonlocal llama_error
        llama_error = llama_error or str(exc)
        for key in [k for k in samples if k[1] == LLAMA_CPP]:
            samples.pop(key)
            if key in workers:
                workers.pop(key).stop()

    samples: dict = {key: {ctx: [] for ctx in cfg.contexts} for key in paths}
    try:
        for key, path in paths.items():
            if key[1] == LLAMA_CPP and llama_error:
                continue  # llama.cpp already failed on the other model
            try:
                workers[key] = Worker(f"{key[0]}:{cfg.moe if key[0] == 'moe' else cfg.dense}", key[1], path,
                                      max_ctx, cfg)
            except MobileMoEError as exc:
                if key[1] != LLAMA_CPP:
                    raise
                drop_llama_cpp(exc)
        total = cfg.repeats * len(cfg.contexts) * len(workers)
        with tqdm(total=total, desc="bench", disable=not progress) as bar:
            for _ in range(cfg.repeats):
                for ctx in cfg.contexts:
                    for key, worker in list(workers.items()):  # alternate models within each context
                        if key not in workers:  # dropped with its llama.cpp partner
                            continue
                        try:
                            samples[key][ctx].append(worker.measure(ctx, cfg.decode_tokens))
                        except MobileMoEError as exc:
                            if key[1] != LLAMA_CPP:
                                raise
                            drop_llama_cpp(exc)
                        bar.update()
        rss = {}
        for key in list(workers):
            try:
                rss[key] = workers[key].peak_rss()
            except MobileMoEError as exc:
                if key[1] != LLAMA_CPP:
                    raise
                drop_llama_cpp(exc)
        load_info = {f"{k[0]}/{k[1]}": w.load_info for k, w in workers.items()}
        kernel_info = {f"{k[0]}/{k[1]}": w.kernel_info for k, w in workers.items()}
    finally:
        for w in workers.values():
            w.stop()
    report = summarize(cfg, samples, rss, bandwidth)
    flat = flat_keys(report)
    if llama_error:
        flat[LLAMA_CPP] = {"error": llama_error}
    return {
        **flat,
        "by_runtime": report,
        "load_rss": load_info,
        "kernels": kernel_info,
        "dram_read_gbs": bandwidth,
        "bench_config": asdict(cfg),
        "machine": machine_info(),
        "int4_bytes": {cfg.moe: accounting.weight_bytes(model_config(cfg.moe)),
                       cfg.dense: accounting.weight_bytes(model_config(cfg.dense))},
        "samples": {f"{k[0]}/{k[1]}": {str(c): v for c, v in s.items()} for k, s in samples.items()},
    }


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Two panels like the paper's figure: prefill TTFT and decode tok/s vs context, MoE vs dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["bench_config"]
    contexts = cfg["contexts"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {MOBILEMOE: "-", LLAMA_CPP: "--"}
    for runtime, data in result["by_runtime"].items():
        if runtime == "ceilings":
            continue
        for role, color in (("moe", "tab:blue"), ("dense", "tab:red")):
            label = f"{cfg[role]} ({runtime})"
            ax1.plot(contexts, [data[f"{role}_ttft_s_{c}"] for c in contexts], styles[runtime], color=color,
                     marker="o", label=label)
            ax2.plot(contexts, [data[f"{role}_decode_tok_s_{c}"] for c in contexts], styles[runtime], color=color,
                     marker="o", label=label)
    for ax, title, ylabel in ((ax1, "Prefill (time to first token)", "TTFT (s)"),
                              (ax2, "Decode", "tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    machine = result["machine"]
    fig.suptitle(f"INT4 MoE vs dense, batch 1, {machine['threads']} threads, {machine['cpu']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
