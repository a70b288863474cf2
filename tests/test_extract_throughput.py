"""How extraction spends a rank's CPUs and batches its model forwards: decode workers and model
threads split the CPUs (recorded as throughput, outside the job), and the model batch, separate from
the Arrow record batch, is chosen per device, recorded in `compute` and kept on resume; without
decoding workers the next batch is decoded during the models' forward; JPEG reduce-on-decode is an
option recorded in `preprocess`."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from pipeline.data.crops import CropDataset, cpu_split
from pipeline.data.featureset import FeatureSet
from pipeline.data.images import decode_rgb
from pipeline.data.jobs import JobError
from stages import extract as extract_stage
from stages.extract import extract
from test_extract_compute import options as compute_options


@pytest.fixture
def folder(tmp_path):
    for i in range(9):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i:02d}.png", size=(20 + i, 20), seed=i)
    return tmp_path / "src"


def options(codebook, folder, out, **kw):
    return compute_options(codebook, folder, out, **{"batch_size": 4, "shard_size": 8, **kw})


def test_cpus_are_split_between_decoding_and_the_models(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_split(None) == (4, 12) and cpu_split(2) == (2, 14) and cpu_split(20) == (20, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpu_split(None) == (1, 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_split(None) == (0, 1)  # half a CPU per rank is one
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpu_split(None) == (0, 2) and cpu_split(1) == (1, 1)


def test_model_threads_are_set_recorded_and_restored(codebook, folder, tmp_path, monkeypatch, request):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))  # for the tests after
    seen, real = [], extract_stage._forward
    monkeypatch.setattr(extract_stage, "_forward", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)
    before = torch.get_num_threads()
    extract(options(codebook, folder, tmp_path / "set"), log=lambda m: None)
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert set(seen) == {3} and manifest["throughput"] == {"decode_workers": 0, "model_threads": 3}
    assert torch.get_num_threads() == before


def test_model_batch_is_chosen_per_device_recorded_and_kept_on_resume(codebook, folder, tmp_path, monkeypatch):
    sizes, real = [], extract_stage._forward
    monkeypatch.setattr(extract_stage, "MODEL_BATCH", {"cpu": 3})
    monkeypatch.setattr(extract_stage, "_forward", lambda tok, t, crops, v, m: sizes.append((len(crops), m)) or real(tok, t, crops, v, m))
    extract(options(codebook, folder, tmp_path / "a"), log=lambda m: None)
    assert FeatureSet.open(tmp_path / "a").manifest["compute"]["model_batch"] == 3 and {m for _, m in sizes} == {3}
    assert sorted(n for n, _ in sizes) == [1, 4, 4]  # record batches stay --batch-size rows
    extract(options(codebook, folder, tmp_path / "b", model_batch=99), log=lambda m: None)
    assert FeatureSet.open(tmp_path / "b").manifest["compute"]["model_batch"] == 4  # at most --batch-size
    with pytest.raises(JobError, match="model_batch"):  # a finished set made with another model batch
        extract(options(codebook, folder, tmp_path / "a", model_batch=1), log=lambda m: None)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    del manifest["compute"]["model_batch"]  # as arra-pipe wrote it before the model batch had its own flag
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    log = []
    assert extract(options(codebook, folder, tmp_path / "a", model_batch=1), log=log.append).status == "up-to-date"
    assert "did not record compute.model_batch" in log[0]


def test_record_batches_are_the_same_whatever_the_model_batch(codebook, folder, tmp_path):
    """Rows, keys and codes do not depend on the model batch; features agree to float16 rounding
    (a batch may change a feature's last bit, which is why the model batch is part of the job)."""
    sets = {}
    for m in (1, 4):
        extract(options(codebook, folder, tmp_path / str(m), model_batch=m), log=lambda m: None)
        sets[m] = list(FeatureSet.open(tmp_path / str(m)).batches())
    assert [b.num_rows for b in sets[1]] == [b.num_rows for b in sets[4]] == [4, 4, 1]
    for a, b in zip(sets[1], sets[4]):
        assert a.column("key").equals(b.column("key")) and a.column("codes").equals(b.column("codes"))
        fa, fb = (x.column("feat.efficientnet-lite0").flatten().to_numpy().astype("float32") for x in (a, b))
        assert abs(fa - fb).max() <= 2 ** -10 * max(1.0, abs(fa).max())  # a float16 step or so apart


def test_jpeg_draft_decodes_to_the_size_needed_and_is_part_of_the_job(codebook, tmp_path):
    """A JPEG is reduced on decode to the smallest scale whose short side still covers the size
    asked; other formats, and no draft, decode at full size; the set records the option."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 640, 3), dtype=np.uint8))
    jpeg, png = io.BytesIO(), io.BytesIO()
    img.save(jpeg, format="JPEG"), img.save(png, format="PNG")
    assert decode_rgb(jpeg.getvalue(), draft=90).size == (160, 100)  # 1/4: 1/8 would be 50 px short
    assert decode_rgb(jpeg.getvalue(), draft=100).size == (160, 100)
    assert decode_rgb(jpeg.getvalue(), draft=101).size == (320, 200)
    assert decode_rgb(jpeg.getvalue()).size == decode_rgb(png.getvalue(), draft=90).size == (640, 400)
    folder = tmp_path / "src" / "c0"
    folder.mkdir(parents=True)
    img.save(folder / "a.jpg")
    done = {}
    for draft in (False, True):
        extract(options(codebook, folder.parent, tmp_path / str(draft), jpeg_draft=draft), log=lambda m: None)
        done[draft] = FeatureSet.open(tmp_path / str(draft)).manifest["preprocess"]["jpeg_draft"]
    assert done == {False: False, True: True}
    with pytest.raises(JobError, match="jpeg_draft"):
        extract(options(codebook, folder.parent, tmp_path / "False", jpeg_draft=True), log=lambda m: None)


PAGE_FAULTS_OF_A_REPEATED_FORWARD = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from pipeline.host_memory import reuse_freed_memory
    reuse_freed_memory()
x = torch.ones(16, 96, 112, 112)  # 77 MB: a 224 px convnet's activation at batch 16
for step in range(30):
    if step == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.hardtanh(x * 2, 0, 6).sum()  # two such blocks allocated and freed per step
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_repeated_forwards_reuse_freed_memory_instead_of_faulting_in_new_pages():
    """The CLI's `reuse_freed_memory`: once the heap has settled, a repeated forward reuses the pages it
    freed; under glibc's default every block over 32 MB is mapped and zeroed anew (about 37,600 page
    faults per step here)."""
    import subprocess
    import sys
    faults = {mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_REPEATED_FORWARD, mode], capture_output=True,
                                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout)
              for mode in ("default", "reuse")}
    assert faults["default"] > 10 * 30000 and faults["reuse"] < faults["default"] / 4, faults


def test_a_new_default_model_batch_keeps_the_recorded_one_on_re_run_and_resume(codebook, folder, tmp_path, monkeypatch):
    """Without --model-batch, the set's recorded model batch is kept: the command that made a set stays
    "the same extraction" when a release changes MODEL_BATCH; --overwrite starts with the new default."""
    monkeypatch.setattr(extract_stage, "MODEL_BATCH", {"cpu": 3})
    extract(options(codebook, folder, tmp_path / "a"), log=lambda m: None)
    monkeypatch.setattr(extract_stage, "MODEL_BATCH", {"cpu": 2})
    assert extract(options(codebook, folder, tmp_path / "a"), log=lambda m: None).status == "up-to-date"
    job = tmp_path / "b" / "progress" / "job.json"  # an interrupted extraction made under the old default
    extract(options(codebook, folder, tmp_path / "b"), log=lambda m: None)
    (tmp_path / "b" / "manifest.json").unlink()
    job.parent.mkdir(exist_ok=True)
    job.write_text(json.dumps({"compute": {"device": "cpu", "model_batch": 3}}))
    assert extract_stage._recorded_model_batch(tmp_path / "b", "cpu") == 3
    assert extract_stage._recorded_model_batch(tmp_path / "b", "cuda") is None
    extract(options(codebook, folder, tmp_path / "a"), overwrite=True, log=lambda m: None)
    assert FeatureSet.open(tmp_path / "a").manifest["compute"]["model_batch"] == 2


def test_without_decoding_workers_the_next_batch_is_decoded_while_the_models_run(codebook, folder, tmp_path, monkeypatch):
    """With 0 workers the models' process decodes too: on the Prefetch thread, so the next record
    batch's images are decoded during this batch's forward, not after it (the same rows result)."""
    events, real_forward, real_load = [], extract_stage._forward, CropDataset._load

    def forward(*a):
        events.append(("forward", threading.current_thread().name, time.perf_counter()))
        time.sleep(0.3)
        out = real_forward(*a)
        events.append(("forward end", threading.current_thread().name, time.perf_counter()))
        return out
    monkeypatch.setattr(extract_stage, "_forward", forward)
    monkeypatch.setattr(CropDataset, "_load", lambda self, r: events.append(("load", threading.current_thread().name, time.perf_counter())) or real_load(self, r))
    extract(options(codebook, folder, tmp_path / "set", workers=0), log=lambda m: None)
    assert {t for kind, t, _ in events if kind == "load"} == {"prefetch"}
    assert {t for kind, t, _ in events if kind != "load"} == {"MainThread"}
    first_end = next(at for kind, _, at in events if kind == "forward end")
    assert sum(kind == "load" and at < first_end for kind, _, at in events) == 9  # all 3 batches decoded during the first forward
    assert FeatureSet.open(tmp_path / "set").manifest["rows"] == 9
