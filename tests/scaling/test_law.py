import math
import json

import numpy as np
import pytest

from mobilemoe.scaling.law import (Law, LawError, LawParams, default_law, fit_family, fit_law, fit_table,
                                   load_law, read_runs, synthetic_runs)

TRUE = LawParams(a=400.0, alpha=-0.33, b=1500.0, beta=-0.32, c=1.8, delta=-0.12, gamma=0.004, omega=0.05, zeta=-0.003)
N_GRID = np.geomspace(2e7, 6e8, 5)
D_GRID = np.geomspace(4e8, 2e10, 4)


def test_joint_fit_recovers_constants_from_noisy_synthetic_runs():
    runs = synthetic_runs(TRUE, N_GRID, D_GRID, [1, 2, 4, 8, 16], noise=0.001, seed=1)
    res = fit_law(runs, n_starts=4, max_iter=100)
    p = res.params
    assert res.joint
    assert p.alpha == pytest.approx(TRUE.alpha, abs=0.01)
    assert p.beta == pytest.approx(TRUE.beta, abs=0.01)
    assert p.c == pytest.approx(TRUE.c, abs=0.03)
    assert p.a == pytest.approx(TRUE.a, rel=0.05)
    assert p.b == pytest.approx(TRUE.b, rel=0.05)
    assert p.delta == pytest.approx(TRUE.delta, abs=0.05)
    assert p.gamma == pytest.approx(TRUE.gamma, abs=0.003)
    # predictions match the true law to well under 1% across the grid, including an unseen E
    for n, d, e in [(3e7, 1e9, 3.0), (5e8, 1.5e10, 12.0)]:
        assert float(p.predict(n, d, e)) == pytest.approx(float(TRUE.predict(n, d, e)), rel=0.005)
    assert res.rmse_log < 0.003


def test_noiseless_fit_is_exact():
    runs = synthetic_runs(TRUE, N_GRID, D_GRID, [1, 4, 16], noise=0.0)
    p = fit_law(runs, n_starts=4, max_iter=100).params
    for name in ("a", "alpha", "b", "beta", "c", "delta", "gamma", "omega", "zeta"):
        assert getattr(p, name) == pytest.approx(getattr(TRUE, name), rel=1e-3, abs=1e-4), name


def test_single_e_family_fit_bootstrap_and_heldout():
    chin = LawParams(a=250.0, alpha=-0.3, b=1600.0, beta=-0.32, c=1.78)
    runs = synthetic_runs(chin, N_GRID, D_GRID, [8], noise=0.002, seed=3)
    res = fit_family(runs, n_starts=4, bootstrap=12, holdout=0.25, max_iter=100)
    assert not res.joint and res.params.e_fixed == 8
    assert res.params.alpha == pytest.approx(-0.3, abs=0.03)
    lo, hi = res.intervals["alpha"]
    assert lo <= res.params.alpha <= hi and hi - lo < 0.1
    assert set(res.intervals) == {"a", "alpha", "b", "beta", "c"}
    assert res.heldout["n"] == 5 and res.heldout["mape"] < 0.01
    # the prediction interval comes from the same bootstrap fits: around the prediction, as narrow as
    # the runs' noise (0.002 in log loss) at a fitted point, and the truth within that noise of it
    n, d = N_GRID[len(N_GRID) // 2], D_GRID[-1]
    pred, lo, hi = res.predict_interval(n, d, 8)
    assert len(res.samples) == res.to_dict()["bootstrap_fits"] > 0
    assert lo <= pred <= hi and hi - lo < 0.01 * pred
    assert abs(float(chin.predict(n, d)) - pred) < 0.002 * pred
    far = res.predict_interval(1000 * N_GRID[-1], d, 8)  # extrapolation widens it
    assert far[2] - far[1] > hi - lo
    assert math.isnan(fit_family(runs, n_starts=4, max_iter=100).predict_interval(n, d, 8)[1])
    ext = fit_family(runs, n_starts=4, holdout=0.2, holdout_mode="largest", max_iter=100)
    assert ext.heldout["mode"] == "largest" and ext.heldout["mape"] < 0.02  # extrapolation to the biggest runs
    with pytest.raises(LawError, match="several E"):
        fit_family(synthetic_runs(chin, N_GRID, D_GRID, [4, 8]))
    with pytest.raises(LawError, match="need at least"):
        fit_law(runs[:4])


def test_run_table_jsonl_csv_fit_and_law_round_trip(tmp_path):
    runs = synthetic_runs(TRUE, N_GRID[:4], D_GRID[:3], [1, 4], noise=0.0)
    jl = tmp_path / "runs.jsonl"
    with open(jl, "w") as fh:
        for r in runs:
            fh.write(json.dumps({"n_act": r.n_act, "tokens": r.tokens, "e": r.e, "loss": r.loss,
                                 "family": "dense" if r.e == 1 else "k1-g8-s4", "status": "done"}) + "\n")
        fh.write(json.dumps({"key": "x", "status": "failed", "error": "boom"}) + "\n")
    back = read_runs(jl)
    assert len(back) == len(runs)
    law, results = fit_table(back, n_starts=3, max_iter=60)
    assert set(law.families) == {"k1-g8-s4", "dense"}
    fam = law.families["k1-g8-s4"]  # joint fit over MoE (E=4) + dense (E=1) anchors
    assert fam.alpha == pytest.approx(TRUE.alpha, abs=0.02)
    path = tmp_path / "law.yaml"
    law.save(path)
    again = load_law(path)
    assert not again.is_default
    assert again.families["k1-g8-s4"].alpha == pytest.approx(fam.alpha)
    csv_path = tmp_path / "runs.csv"
    csv_path.write_text("d_model,layers,E,g,k,s,vocab,tokens,loss\n256,6,8,8,1,4,1000,1e9,3.1\n")
    (r,) = read_runs(csv_path)
    assert r.family == "k1-g8-s4" and r.e == 8.0 and r.n_act > 0


def test_bad_rows_and_law_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"n_act": 1e8, "tokens": "many", "loss": 3.0}) + "\n")
    with pytest.raises(LawError, match="'tokens'"):
        read_runs(bad)
    lf = tmp_path / "law.yaml"
    lf.write_text("kind: mobilemoe-scaling-law\nfamilies:\n  '*': {a: 1, alpha: -0.3, b: 1, beta: -0.3, c: 1, gama: 0}\n")
    with pytest.raises(LawError, match=r"families\.\*\.gama"):
        load_law(lf)


def test_default_law_is_marked_default():
    law = default_law()
    assert law.is_default and "*" in law.families
    assert isinstance(law, Law)
    # MoE at the tiers' expansion beats dense at equal active params and tokens
    assert law.predict(3e8, 6e12, 8.0, "k1-g8-s4", g=8, s=4) < law.predict(3e8, 6e12, 1.0, "dense")


def _seeded(runs, seeds=3, noise=0.01, rng_seed=0):
    """Each run repeated over ``seeds`` with its own noise, tagged with a shared point key."""
    from mobilemoe.scaling.law import Run

    rng = np.random.default_rng(rng_seed)
    return [Run(r.n_act, r.tokens, r.e, r.loss * float(np.exp(rng.normal(0, noise))), r.family,
                {"point": f"p{i}", "seed": s}) for i, r in enumerate(runs) for s in range(seeds)]


def test_fit_uses_every_seed_and_holds_out_whole_points():
    chin = LawParams(a=250.0, alpha=-0.3, b=1600.0, beta=-0.32, c=1.78)
    runs = _seeded(synthetic_runs(chin, N_GRID, D_GRID, [8]))
    res = fit_family(runs, n_starts=4, bootstrap=8, holdout=0.25, max_iter=100)
    assert res.n_runs == 60 and res.n_points == 20 and res.to_dict()["n_points"] == 20
    assert res.params.alpha == pytest.approx(-0.3, abs=0.05)
    assert res.heldout["n"] == 15  # 5 points x 3 seeds: no point split between train and test
    lo, hi = res.intervals["alpha"]
    assert lo <= res.params.alpha <= hi
    # seeds are not design points: 5 points x 3 seeds cannot fit 5 constants
    with pytest.raises(LawError, match="5 distinct points"):
        fit_family(runs[:15])


def test_bootstrap_resamples_points_not_seeds():
    from mobilemoe.scaling.law import _cluster_weights, point_clusters

    runs = _seeded(synthetic_runs(TRUE, N_GRID[:2], D_GRID[:2], [1]), seeds=3)
    clusters = point_clusters(runs)
    assert clusters == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = _cluster_weights(clusters, len(runs), rng)
        assert w.sum() == len(runs)  # 4 points drawn, 3 seeds each
        for c in clusters:
            assert len(set(w[c])) == 1  # a point's seeds are drawn together
    # without point tags (no seeds): one cluster per run, the plain per-run bootstrap
    plain = synthetic_runs(TRUE, N_GRID[:2], D_GRID[:2], [1])
    assert point_clusters(plain) == [[i] for i in range(len(plain))]

