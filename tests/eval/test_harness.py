"""lm-evaluation-harness: the registered ``mobilemoe`` model on a local yaml task equals our scorer."""

from __future__ import annotations

import json

import pytest

ITEMS = [
    {"query": "Question: What color is the sky?\nAnswer:", "choices": ["blue", "green", "a big red"], "gold": 0},
    {"query": "Question: What is two plus two?\nAnswer:", "choices": ["four", "five"], "gold": 0},
    {"query": "The cat sat on the", "choices": ["mat", "hat", "elephant house", "sofa"], "gold": 2},
    {"query": "The quick brown fox jumps over the lazy", "choices": ["dog", "cat"], "gold": 0},
    {"query": "Janet has 16 eggs. She eats 3 and bakes 4, so she sells", "choices": ["9", "18", "7"], "gold": 0},
]

YAML = """task: mobilemoe_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture()
def lm_eval(monkeypatch, tmp_path):
    # Strictly local: no hub access, caches under tmp (read when `datasets` is first imported).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")


def _harness_equals_ours(lm_eval, tiny_ckpt, tiny_lm, tmp_path, records, items):
    """Run `records` as a local lm-eval task through the registered model; compare with our scorer."""
    import mobilemoe.eval.harness  # noqa: F401  (registers "mobilemoe")
    from lm_eval.tasks import TaskManager

    from mobilemoe.eval import evaluate_mc, score_items

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "local_mc.yaml").write_text(YAML.format(path=data))

    out = lm_eval.simple_evaluate(model="mobilemoe", model_args=f"path={tiny_ckpt},batch_size=3",
                                  tasks=["mobilemoe_local_mc"], task_manager=TaskManager(include_path=str(tasks_dir)),
                                  log_samples=True, bootstrap_iters=0)
    got = out["results"]["mobilemoe_local_mc"]
    ours = evaluate_mc(tiny_lm, "local", items)
    assert got["acc,none"] == pytest.approx(ours.acc)
    assert got["acc_norm,none"] == pytest.approx(ours.acc_norm)
    # and item by item, choice by choice
    scores = score_items(tiny_lm, items)
    samples = sorted(out["samples"]["mobilemoe_local_mc"], key=lambda s: s["doc_id"])
    for s, mine in zip(samples, scores):
        theirs = [float(r[0][0]) for r in s["resps"]]
        assert theirs == pytest.approx(mine.logprobs, abs=1e-4)


def test_registered_model_matches_own_scorer(lm_eval, tiny_ckpt, tiny_lm, tmp_path):
    from mobilemoe.eval import MCItem

    items = [MCItem([r["query"]] * len(r["choices"]), [" " + c for c in r["choices"]], r["gold"], r["choices"])
             for r in ITEMS]
    _harness_equals_ours(lm_eval, tiny_ckpt, tiny_lm, tmp_path, ITEMS, items)


@pytest.mark.parametrize("task", ["arc_easy", "piqa"])
def test_harness_equals_ours_on_real_items(lm_eval, tiny_ckpt, tiny_lm, tmp_path, task, shared_data):
    """The first 20 items of the local arc_easy / piqa files, as our readers build them."""
    from mobilemoe.eval.tasks import get_task, load_task_items

    root = shared_data(get_task(task).path)  # skips on a clone without the shared datasets
    items = load_task_items(task, root, limit=20)
    assert all(len(set(i.contexts)) == 1 for i in items)  # one context per item: a query/choices task
    records = [{"query": i.contexts[0], "choices": [c[1:] for c in i.continuations], "gold": i.gold} for i in items]
    assert all(c == " " + t for i in items for c, t in zip(i.continuations, i.choice_texts))
    _harness_equals_ours(lm_eval, tiny_ckpt, tiny_lm, tmp_path, records, items)


def test_cli_entry_point(lm_eval, tiny_ckpt, tmp_path, capsys):
    from mobilemoe.eval.harness import main

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (tmp_path / "local_mc.yaml").write_text(YAML.format(path=data))
    main(["run", "--model", "mobilemoe", "--model_args", f"path={tiny_ckpt}", "--tasks", "mobilemoe_local_mc",
          "--include_path", str(tmp_path), "--limit", "2"])
    out = capsys.readouterr().out
    assert "mobilemoe_local_mc" in out and "acc_norm" in out


def test_rolling_and_generate_until(lm_eval, tiny_lm):
    from lm_eval.api.instance import Instance

    from mobilemoe.eval import perplexity
    from mobilemoe.eval.harness import MobileMoELM

    model = MobileMoELM(lm=tiny_lm)
    text = "The quick brown fox jumps over the lazy dog."
    (ll,) = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert ll == pytest.approx(-perplexity(tiny_lm, text).nll, rel=1e-6)
    req = Instance("generate_until", {}, ("The sky is", {"until": ["\n"], "max_gen_toks": 5}), 0)
    (gen,) = model.generate_until([req])
    assert gen == tiny_lm.generate("The sky is", max_new_tokens=5, stop=["\n"])
    ((lp, greedy),) = model.loglikelihood([Instance("loglikelihood", {}, ("The sky is", " blue"), 0)])
    ref = tiny_lm.loglikelihood([("The sky is", " blue")])[0]
    assert (lp, greedy) == (ref.logprob, ref.is_greedy)
