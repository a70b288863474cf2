"""`arra-pipe run` at the `smoke` scale on the embedded Fashion-MNIST subset: every stage runs, the
arms differ only in lambda, seeds repeat both arms, and the table reports mean ± sd per arm."""

from __future__ import annotations

import json
import statistics

from stages.demo import EMBEDDED_FASHION_MNIST
from stages.experiment import run_experiment


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
    assert fid["mean"] == statistics.fmean(values) and fid["sd"] == statistics.stdev(values) and fid["n_seeds"] == 2
    base = report["summary"]["plain"]["FID"]["mean"]
    assert fid["change_vs_plain"] == (fid["mean"] - base) / abs(base)
    assert fid["n_generated"] == 30 and fid["n_reference"] == 60  # 3 per class, the first 60 test images
    assert 0 <= report["summary"]["plain"]["class accuracy (proxy)"]["mean"] <= 1

    table = (out / "results.md").read_text()
    assert "| FID | 30 / 60 |" in table and "±" in table and "Seeds: [0, 1]" in table
    assert json.loads((out / "results.json").read_text())["summary"] == report["summary"]
    assert any(c.startswith("arra-pipe train") and "--lambda 1.0 --seed 1" in c for c in report["commands"])
    for tag in ("plain-seed0", "arra-seed1"):
        assert (out / "samples" / tag / "grid.png").exists() and (out / "models" / tag / "config.json").exists()
