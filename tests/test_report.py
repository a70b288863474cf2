"""`arra-pipe report` on hand-made run, demo and experiment folders (no training): both pages are
written, every image they show exists beside them, and headless Chromium renders the HTML with
its images loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from stages.report import class_names, report
from stages.sample import save_grid

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TAB_BLUE = np.array([31, 119, 180])  # matplotlib's first line colour: seen only if the curves PNG loaded


def fake_run(run, steps=5):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "ce": 6 - s / 2, "gva": 1 - s / 10}) + "\n"
                                               for s in range(1, steps + 1)))
    (run / "train_config.json").write_text(json.dumps({"options": {"steps": steps, "lam": 1.0}}))
    return run


def fake_samples(folder, classes=3, per_class=2):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    save_grid([rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(classes * per_class)],
              folder / "grid.png", cols=per_class)
    (folder / "samples.jsonl").write_text("".join(json.dumps({"class": c}) + "\n"
                                                  for c in range(classes) for _ in range(per_class)))
    (folder / "eval.json").write_text(json.dumps({
        "metrics": [{"metric": "FID", "value": 123.4, "n_generated": 6, "n_reference": 6, "space": "inception"}],
        "generated": {"path": str(folder), "seeds": [0, 5]}}))
    return folder


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def shown_images(folder):
    parser = Images()
    parser.feed((folder / "report.html").read_text())
    md = (folder / "report.md").read_text()
    assert parser.src and all(f"]({src})" in md for src in parser.src)  # the same PNGs in both pages
    assert all((folder / src).is_file() and not src.startswith("/") for src in parser.src)
    return parser.src


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, codebook):
    """A demo folder as `run_demo` leaves it, with a real (tiny) training feature set for the reconstructions."""
    from conftest import _extract
    out = tmp_path_factory.mktemp("demo")
    for i in range(4):
        write_image(out / "images" / f"c{i % 2}" / f"{i}.png", size=(16, 16), seed=i)
    _extract(codebook, out / "images", out / "train")
    fake_run(out / "run")
    fake_samples(out / "samples")
    (out / "demo.json").write_text(json.dumps({"steps": [{"name": "train", "command": "arra-pipe train x --out y",
                                                           "seconds": 12.0}]}))
    assert report(str(out)) == out / "report.html"
    return out


def test_demo_report_shows_curves_grid_reconstructions_table_and_links(demo_dir):
    assert sorted(shown_images(demo_dir)) == ["curves.png", "reconstructions.png", "samples.png"]
    md = (demo_dir / "report.md").read_text()
    assert "arra-pipe train x --out y" in md and "FID" in md and "123.4" in md and "[training run metrics](run/metrics.jsonl)" in md
    assert Image.open(demo_dir / "samples.png").width >= 4 * 16  # enlarged, not shown at 8 px


def test_run_and_experiment_reports(tmp_path):
    run = fake_run(tmp_path / "run")
    assert report(str(run)) == run / "report.html" and shown_images(run) == ["curves.png"]
    assert "| lam | 1.0 |" in (run / "report.md").read_text()

    exp = tmp_path / "exp"
    summary = {arm: {"FID": {"mean": m, "sd": 1.5, "n_seeds": 2, "n_generated": 6, "n_reference": 6}}
               for arm, m in (("plain", 120.0), ("arra", 100.0))}
    runs = [{"arm": a, "seed": s} for s in (0, 1) for a in summary]
    for r in runs:
        fake_run(exp / "runs" / f"{r['arm']}-seed{r['seed']}")
        fake_samples(exp / "samples" / f"{r['arm']}-seed{r['seed']}")
    (exp / "results.json").write_text(json.dumps({
        "experiment": "fmnist-arra-base.toml", "description": "two arms", "scale": "smoke", "data": "d", "device": "cpu",
        "machine": "x86_64", "seeds": [0, 1], "runs": runs, "summary": summary, "seconds": {"train": 1.0}, "commands": ["c"]}))
    report(str(exp))
    assert shown_images(exp) == ["curves.png", "samples-plain.png", "samples-arra.png"]
    assert "| FID | 6 / 6 | 120 ± 1.5 | 100 ± 1.5 |" in (exp / "report.md").read_text()

    with pytest.raises(ValueError, match="neither"):
        report(str(tmp_path))


def test_class_names_are_fashion_mnist_only_for_that_source():
    assert class_names(3, "fashion-mnist") == ["T-shirt/top", "trouser", "pullover"]
    assert class_names(2, "imagefolder") == ["class 0", "class 1"]


def chromium(tmp_path, *args):
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(not CHROMIUM, reason="no Chromium: `apt-get install chromium` (Debian) for the browser check")
def test_chromium_renders_the_report_with_its_images(demo_dir, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", (demo_dir / "report.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 10  # not a blank page
    assert (np.abs(pixels - TAB_BLUE).sum(-1) < 30).sum() > 100  # the curves were drawn
    # a copy beside the page (same relative links) that records, once loaded, which images decoded
    check = demo_dir / "check.html"
    check.write_text((demo_dir / "report.html").read_text() + "<script>addEventListener('load', () => document.body.dataset"
                     ".loaded = [...document.images].map(i => i.complete && i.naturalWidth > 0 ? 1 : 0).join(''))</script>")
    try:
        dom = chromium(tmp_path, "--dump-dom", check.as_uri())
    finally:
        check.unlink()
    assert f'data-loaded="{"1" * len(shown_images(demo_dir))}"' in dom
