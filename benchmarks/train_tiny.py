"""The training issue's measurements on the embedded default corpus (the Python standard library).

1. Pre-train a tiny MoE (recipes/tiny.yaml, pretrain stage) and a dense model with the same active
   parameters on the same tokens; record validation curves next to the corpus's unigram baseline.
2. INT4: validation loss of the float model, of its plain post-training INT4 quantization (PTQ) and
   of a short quantization-aware fine-tune (QAT) converted to INT4.
3. SFT on GSM8K train (answers-only loss), then generate an answer to a GSM8K test question.

Prints JSON and writes a PNG of the curves. Usage:
    python benchmarks/train_tiny.py --out runs/train_tiny [--plot runs/train_tiny/curves.png]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import yaml

from mobilemoe.train.recipe import recipe_from_dict
from mobilemoe.train.run import run_recipe

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


def tiny_recipe(name: str, preset: str, stages: list[dict], tokenizer: str | None = None) -> dict:
    base = yaml.safe_load(Path("recipes/tiny.yaml").read_text())
    base["name"] = name
    if tokenizer is not None:  # reuse the pre-trained model's tokenizer
        base["data"]["tokenizer"] = tokenizer
    base["model"] = {"preset": preset, "overrides": {"vocab_size": 512}}
    base["data"]["limit_files"] = 80  # the corpus BENCHMARKS.md's numbers were measured on (tiny.yaml now uses 160)
    base["stages"] = stages
    return base


def pretrain_stage(steps: int) -> dict:
    base = yaml.safe_load(Path("recipes/tiny.yaml").read_text())
    stage = copy.deepcopy(base["stages"][0])
    stage.update(max_steps=steps, eval_every=25, eval_steps=8, checkpoint_every=100, warmup_steps=30)
    return stage


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def evals(stage_dir: Path) -> list[dict]:
    return [r for r in metrics(stage_dir) if "val_loss" in r]


def train_stats(stage_dir: Path) -> dict:
    """Tokens and wall time of a stage from its metrics log (also right for a resumed, skipped stage).

    Steps are logged every ``log_every`` steps, each record with that step's tokens and a timestamp.
    """
    logged = [r for r in metrics(stage_dir) if "loss" in r and "tokens" in r]
    first, last = logged[0], logged[-1]
    per_step = (last["time"] - first["time"]) / max(last["step"] - first["step"], 1)
    wall = per_step * last["step"]
    tokens = last["tokens"] * last["step"]  # constant tokens per step (fixed batch and sequence length)
    return {"steps": last["step"], "tokens": tokens, "wall_seconds": wall, "tokens_per_s": tokens / wall,
            "final_val_loss": evals(stage_dir)[-1]["val_loss"]}


def val_loss(ckpt: Path, ids: list[int], window: int = 256) -> float:
    from mobilemoe.eval.lm import load_eval_lm
    from mobilemoe.eval.perplexity import perplexity_ids

    lm = load_eval_lm(ckpt, max_length=window)
    nll, count, _, _ = perplexity_ids(lm, ids, window=window, stride=window)
    return nll / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/train_tiny")
    parser.add_argument("--steps", type=int, default=1500, help="pre-training steps per model")
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    result: dict = {}

    # 1. MoE vs dense pre-training, same data, tokens and seed.
    for label, preset in (("moe", "tiny-moe"), ("dense", "tiny-dense")):
        recipe = recipe_from_dict(tiny_recipe(f"tiny-{label}", preset, [pretrain_stage(args.steps)]))
        run_recipe(recipe, out / label, resume=True)
        result[label] = {"preset": preset, **train_stats(out / label / "pretrain"),
                         "curve": [(r["step"], r["val_loss"]) for r in evals(out / label / "pretrain")]}
    from mobilemoe.accounting import active_params
    from mobilemoe.commands.demo import _shard_tokens, unigram_loss
    from mobilemoe.config import preset as get_preset

    for label in ("moe", "dense"):
        result[label]["active_params"] = round(active_params(get_preset(result[label]["preset"], vocab_size=512)))
    val = _shard_tokens(out / "moe", "val")
    result["unigram_val_loss"] = unigram_loss(_shard_tokens(out / "moe", "train"), val, 512)

    # 2. QAT vs PTQ (INT4) on the same corpus. QAT continues training, so the float and PTQ rows
    #    come from a float model continued for the same steps with the same schedule (the control).
    from mobilemoe.quant import quantize_checkpoint

    moe_final = out / "moe" / "pretrain" / "final"
    cont = {**pretrain_stage(args.qat_steps), "lr": 3.0e-4, "min_lr": 3.0e-5, "warmup_steps": 0, "eval_every": 50}
    run_recipe(recipe_from_dict(tiny_recipe("tiny-float-cont", "tiny-moe", [{**cont, "name": "midtrain"}])),
               out / "float-cont", init=moe_final, resume=True)
    run_recipe(recipe_from_dict(tiny_recipe("tiny-qat", "tiny-moe", [{**cont, "name": "qat", "export_int4": True}])),
               out / "qat", init=moe_final, resume=True)
    float_cont = out / "float-cont" / "midtrain" / "final"
    quantize_checkpoint(float_cont, out / "ptq-int4", overwrite=True)
    ids = val[:16384].tolist()
    r = {"float_val_loss": val_loss(float_cont, ids), "ptq_int4_val_loss": val_loss(out / "ptq-int4", ids),
         "qat_int4_val_loss": val_loss(out / "qat" / "qat" / "final-int4", ids), "steps": args.qat_steps}
    r["ptq_gap"] = r["ptq_int4_val_loss"] - r["float_val_loss"]
    r["qat_gap"] = r["qat_int4_val_loss"] - r["float_val_loss"]
    r["gap_recovered"] = 1 - r["qat_gap"] / r["ptq_gap"] if r["ptq_gap"] > 0 else None
    result["int4"] = r

    # 3. SFT on GSM8K, then answer a test question with the chat template.
    tokenizer = str(out / "moe" / "tokenizer.json")
    sft_stage = {**pretrain_stage(args.sft_steps), "name": "sft", "seq_len": 512, "micro_batch_size": 4,
                 "lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_steps": 20, "loss_on": "answers", "eval_every": 50,
                 "data": {"source": str(GSM8K / "train.jsonl"), "format": "gsm8k", "tokenizer": tokenizer,
                          "val_fraction": 0.02}}
    recipe = recipe_from_dict(tiny_recipe("tiny-sft", "tiny-moe", [sft_stage], tokenizer=tokenizer))
    run_recipe(recipe, out / "sft", init=moe_final, resume=True)
    from mobilemoe.data.chat import encode_prompt
    from mobilemoe.data.tokenizer import END
    from mobilemoe.runtime import Engine

    question = json.loads((GSM8K / "test.jsonl").read_text().splitlines()[0])["question"]
    engine = Engine.load(out / "sft" / "sft" / "final", backend="reference")
    prompt = encode_prompt(engine.tokenizer, [{"role": "user", "content": question}])
    gen = engine.generate(prompt, 300, stop_ids=[engine.tokenizer.require_id(END)])
    answer = engine.tokenizer.decode(gen.ids)
    result["sft"] = {**train_stats(out / "sft" / "sft"), "question": question, "answer": answer,
                     "has_final_answer_marker": "####" in answer, "stopped_by": gen.stopped_by}
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, color in (("moe", "tab:blue"), ("dense", "tab:red")):
            steps, losses = zip(*result[label]["curve"])
            ax.plot(steps, losses, marker="o", color=color,
                    label=f"{result[label]['preset']} ({result[label]['active_params'] / 1e3:.0f}K active)")
        ax.axhline(result["unigram_val_loss"], color="gray", ls="--", label="unigram baseline")
        ax.set_xlabel("step (8 x 128 tokens)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Tiny MoE vs dense on the Python stdlib")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
