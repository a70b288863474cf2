"""`arra-pipe run` at the `smoke` scale on the embedded Fashion-MNIST subset: every stage runs, the
arms differ only in lambda, seeds repeat both arms, and the table reports mean ± sd per arm."""

from __future__ import annotations

import json
import math

import pytest

from stages.demo import EMBEDDED_FASHION_MNIST
from stages.experiment import markdown, paired, run_experiment, summarize


@pytest.mark.timeout(2400)  # 2 extractions, 4 trainings, samplings and evals: 1799 s at load average 7 on 2 cores (not a hang)
def test_smoke_experiment_two_seeds_two_arms(tmp_path):
    out = tmp_path / "exp"
    report = run_experiment("fmnist-arra-base", "smoke", seeds=2, out=str(out), data=str(EMBEDDED_FASHION_MNIST),
                            log=lambda m: None)
    runs = report["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [("plain", 0), ("arra", 0), ("plain", 1), ("arra", 1)]
    for plain, arra in (runs[0:2], runs[2:4]):  # no arm is tuned that the other is not
        differs = {k for k in plain["options"] if plain["options"][k] != arra["options"][k]}
        assert differs == {"lam"} and (plain["options"]["lam"], arra["options"]["lam"]) == (0.0, 1.0)
    assert runs[0]["options"]["seed"] == 0 and runs[2]["options"]["seed"] == 1

    fid = report["summary"]["arra"]["FID"]
    values = [r["metrics"]["FID"]["value"] for r in runs if r["arm"] == "arra"]
    assert fid["n_seeds"] == 2 and fid["mean"] == pytest.approx((values[0] + values[1]) / 2)
    assert fid["sd"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))  # the sample sd of two values
    base = report["summary"]["plain"]["FID"]["mean"]
    assert fid["change_vs_plain"] == (fid["mean"] - base) / abs(base)
    assert fid["n_generated"] == 30 and fid["n_reference"] == 60  # 3 per class, the first 60 test images
    assert 0 <= report["summary"]["plain"]["class accuracy (proxy)"]["mean"] <= 1

    # FID and KID carry the real-vs-real floor (held-out test rows, same n); the clip rate is reported per run
    assert fid["floor"] == runs[0]["metrics"]["FID"]["floor"] == runs[3]["metrics"]["FID"]["floor"] > 0
    assert "held-out rows" in runs[0]["metrics"]["FID"]["floor_space"] and "KID" in report["summary"]["arra"]
    for r in runs:
        assert r["clipping"]["steps"] == 20 and r["metrics"]["steps clipped (share, training)"]["value"] == r["clipping"]["share"]
    assert report["paired"]["arra"]["FID"]["n_pairs"] == 2 and report["paired"]["arra"]["FID"]["p_value"] is not None

    table = (out / "results.md").read_text()
    assert "| FID | 30 / 60 |" in table and "±" in table and "Seeds: [0, 1]" in table
    assert json.loads((out / "results.json").read_text())["summary"] == report["summary"]
    assert any(c.startswith("arra-pipe train") and "--lambda 1.0 --seed 1" in c for c in report["commands"])
    for tag in ("plain-seed0", "arra-seed1"):
        assert (out / "samples" / tag / "grid.png").exists() and (out / "models" / tag / "config.json").exists()


def test_summary_is_the_mean_and_sample_sd_over_seeds_and_the_change_against_the_first_arm():
    def run(arm, seed, fid):
        return {"arm": arm, "seed": seed, "metrics": {"FID": {"value": fid, "n_generated": 30, "n_reference": 60}}}
    runs = [run("plain", 0, 10.0), run("arra", 0, 1.0), run("plain", 1, 12.0), run("arra", 1, 2.0),
            run("plain", 2, 14.0), run("arra", 2, 4.0)]
    summary = summarize(runs, ["plain", "arra"], "efficientnet-lite0")
    # arra: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9 over n - 1 = 2 -> variance 7/3
    assert summary["arra"]["FID"] == pytest.approx({"mean": 7 / 3, "sd": math.sqrt(7 / 3), "n_seeds": 3, "n_generated": 30,
                                                     "n_reference": 60, "change_vs_plain": (7 / 3 - 12) / 12})
    assert summary["plain"]["FID"] == pytest.approx({"mean": 12.0, "sd": 2.0, "n_seeds": 3, "n_generated": 30,
                                                      "n_reference": 60})
    one_seed = summarize(runs[:2], ["plain", "arra"], "efficientnet-lite0")
    assert one_seed["arra"]["FID"]["sd"] is None and one_seed["arra"]["FID"]["change_vs_plain"] == -0.9


def test_paired_differences_give_the_t_test_interval_and_the_seeds_for_80_percent_power():
    def run(arm, seed, fid):
        return {"arm": arm, "seed": seed, "metrics": {"FID": {"value": fid, "n_generated": 30, "n_reference": 60}},
                "seconds": {}}
    runs = [run("plain", 0, 10.0), run("arra", 0, 9.0), run("plain", 1, 12.0), run("arra", 1, 11.5),
            run("plain", 2, 11.0), run("arra", 2, 10.0)]
    d = paired(runs, ["plain", "arra"])["arra"]["FID"]
    # differences -1, -0.5, -1: mean -5/6, sd sqrt(1/12), t = mean / (sd / sqrt 3) = -5 exactly;
    # t(2 df): P(|T| > 5) = 1 - 5 / sqrt(25 + 2) = 0.037750; critical 4.302653, half-width 4.302653 * sd / sqrt 3
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert d["n_pairs"] == 3 and d["mean_diff"] == pytest.approx(-5 / 6) and d["sd_diff"] == pytest.approx(math.sqrt(1 / 12))
    assert d["t"] == pytest.approx(-5.0) and d["p_value"] == pytest.approx(1 - 5 / math.sqrt(27))
    assert d["ci95"] == pytest.approx([-5 / 6 - half, -5 / 6 + half], rel=1e-6) and d["resolved"]
    # the pairing: the differences' SE is sd / sqrt 3 = 1/6; unpaired, each arm's variance (1 and 19/12) over 3
    assert d["se_paired"] == pytest.approx(1 / 6) and d["se_unpaired"] == pytest.approx(math.sqrt((1 + 19 / 12) / 3))
    # effect 5/6 / sqrt(1/12) = 2.887 sd: 80 % power needs 4 seeds (noncentral t: 3 give 0.72, 4 give 0.96)
    assert d["seeds_to_resolve"] == 4
    # the same spread around a smaller effect is not resolved, and says how many seeds would be
    runs[1]["metrics"]["FID"]["value"], runs[3]["metrics"]["FID"]["value"] = 10.2, 11.7  # -> +0.2, -0.3, -1
    d = paired(runs, ["plain", "arra"])["arra"]["FID"]
    # mean -0.367, sd 0.603 (effect 0.608 sd): 23 seeds give 0.796 power, 24 give 0.814
    assert not d["resolved"] and d["seeds_to_resolve"] == 24
    assert d["p_value"] == pytest.approx(0.402562, abs=1e-6)
    table = markdown({"experiment": "x.toml", "scale": "smoke", "description": "", "scale_note": "", "data": "d",
                      "device": "cpu", "machine": "m", "seeds": [0, 1, 2], "runs": runs, "seconds": {}, "commands": [],
                      "summary": summarize(runs, ["plain", "arra"], "t"), "paired": paired(runs, ["plain", "arra"])}, "t")
    assert "| FID | arra | -0.367 ± 0.6 | [-1.86, 1.13] | 0.4 | 0.35 / 0.79 | no | 24 |" in table


def test_the_real_vs_real_floor_stands_beside_each_metric_that_has_one():
    def run(arm, seed, fid, kid):
        return {"arm": arm, "seed": seed, "seconds": {}, "metrics": {
            "FID": {"value": fid, "n_generated": 1000, "n_reference": 2000, "floor": 19.25},
            "KID": {"value": kid, "n_generated": 1000, "n_reference": 2000, "floor": None},
            "class accuracy (proxy)": {"value": 0.5, "n_generated": 1000, "n_reference": 10000}}}
    runs = [run("plain", 0, 40.0, 0.02), run("arra", 0, 39.0, 0.019), run("plain", 1, 41.0, 0.021), run("arra", 1, 40.5, 0.02)]
    summary = summarize(runs, ["plain", "arra"], "t")
    assert summary["arra"]["FID"]["floor"] == 19.25 and "floor" not in summary["arra"]["KID"]
    assert "floor" not in summary["plain"]["class accuracy (proxy)"]
    table = markdown({"experiment": "x.toml", "scale": "cpu", "description": "", "scale_note": "", "data": "d",
                      "device": "cpu", "machine": "m", "seeds": [0, 1], "runs": runs, "seconds": {}, "commands": [],
                      "summary": summary, "paired": paired(runs, ["plain", "arra"])}, "t")
    assert "| metric | n_gen / n_ref | real-vs-real floor | plain | arra | arra vs plain |" in table
    assert "| FID | 1000 / 2000 | 19.25 | 40.5 ± 0.71 | 39.75 ± 1.1 | -1.9% |" in table
    assert "| KID | 1000 / 2000 | – |" in table


def test_clip_rate_counts_the_steps_whose_norm_exceeded_the_clip(tmp_path):
    from stages.experiment import clip_rate
    log = tmp_path / "metrics.jsonl"
    norms = [0.5, 1.5, 1.0, 2.0, None, 0.9]  # 1.0 is not above the clip; a step without a norm is not counted
    log.write_text("".join(json.dumps({"step": i + 1, "grad_norm": n}) + "\n" for i, n in enumerate(norms)))
    rate = clip_rate(log, 1.0)
    assert (rate["steps"], rate["clipped"], rate["share"]) == (5, 2, 0.4) and rate["grad_norm_median"] == 1.0
    assert "2 of 5 steps" in rate["space"]
    assert clip_rate(log, 0.0) is None and clip_rate(tmp_path / "missing.jsonl", 1.0) is None
