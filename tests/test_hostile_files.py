"""Hostile files in a source: symlinks that lead out of a folder source, FIFOs, devices, files too
large to read, and tiny images that declare a huge side. Each becomes a reject (or, for a
folder's tar/parquet/idx files, a `SourceError`) naming the file, quickly and in little memory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_image
from PIL import Image
from test_bad_input import category, encoded, random_rgb, rejects_by_key
from test_sources import FASHION_MINI, write_img2dataset_shard

from pipeline.data.featureset import FeatureSet
from pipeline.data.images import DEFAULT_MAX_SIDE, Rejected, center_crop, decode_rgb
from pipeline.data.sources import SourceError, SourceOptions, load_image, read_source
from stages.cli import main
from pipeline.data.jobs import JobResult

SECRET = "TOP SECRET: the launch codes"
ROOT = Path(__file__).resolve().parent.parent


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` turns it into a reject."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging when the body blocks (on a FIFO, say) for longer than `seconds`."""
    def hang(*_):
        raise Hang(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def captions(out) -> list[str]:
    return FeatureSet.open(out).table().column("caption").to_pylist()


# ---------------------------------------------------------------------------------------------
# symlinks leading out of a folder source


@pytest.fixture
def linked_folder(tmp_path):
    """An image folder holding a caption and an image that are symlinks to files outside it, and
    a symlink that stays inside it."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    write_image(outside / "far.png", seed=9)
    src = tmp_path / "src"
    write_image(src / "cls" / "plain.png", seed=1)
    write_image(src / "cls" / "captioned.png", seed=2)
    (src / "cls" / "captioned.txt").symlink_to(outside / "secret.txt")
    (src / "cls" / "far.png").symlink_to(outside / "far.png")
    write_image(src / "real" / "near.png", seed=3)
    (src / "cls" / "near.png").symlink_to(src / "real" / "near.png")
    return src


def test_sidecar_and_image_links_leading_out_of_the_folder_are_rejected(linked_folder, run_extract):
    result, out = run_extract(linked_folder)

    assert not any(SECRET in r.caption for r in read_source(linked_folder).records), "the secret was read"
    assert sorted(FeatureSet.open(out).table().column("key").to_pylist()) == ["cls/near.png", "cls/plain.png",
                                                                              "real/near.png"]
    assert not any(SECRET in c for c in captions(out))
    rejects = rejects_by_key(out)
    assert {k: category(r["reason"]) for k, r in rejects.items()} == {"cls/captioned.png": "outside-root",
                                                                       "cls/far.png": "outside-root"}
    assert "cls/captioned.txt" in rejects["cls/captioned.png"]["reason"]
    assert "cls/far.png" in rejects["cls/far.png"]["reason"]
    assert all("--follow-symlinks" in r["reason"] for r in rejects.values())
    assert SECRET not in (out / "rejects.jsonl").read_text()


def test_follow_symlinks_reads_links_leading_out(linked_folder, run_extract):
    result, out = run_extract(linked_folder, source_options={"follow_symlinks": True})

    assert result.rejects == 0 and result.rows == 5
    assert SECRET in captions(out)


def test_folder_tar_and_idx_files_leading_out_are_a_source_error(tmp_path):
    write_img2dataset_shard(tmp_path / "elsewhere", 0, [("000000000", "a caption", "success")])
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    for name in ("00000.tar", "00000.parquet"):
        (i2d / name).symlink_to(tmp_path / "elsewhere" / name)
    fmnist = tmp_path / "fmnist"
    fmnist.mkdir()
    for f in FASHION_MINI.glob("t10k-*"):
        (fmnist / f.name).symlink_to(f)

    with pytest.raises(SourceError, match=r"^outside-root: 00000.tar is a symlink to .*--follow-symlinks"):
        read_source(i2d, "img2dataset")
    with pytest.raises(SourceError, match=r"^outside-root: t10k-images-idx3-ubyte.gz is a symlink to"):
        read_source(fmnist, options=SourceOptions(split="test"))
    follow = SourceOptions(split="test", follow_symlinks=True)
    assert [r.caption for r in read_source(i2d, "img2dataset", follow).records] == ["a caption"]
    assert len(read_source(fmnist, options=follow).records) == 500


# ---------------------------------------------------------------------------------------------
# FIFOs and devices: only regular files are opened


def test_fifo_image_and_fifo_caption_do_not_hang(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "cls" / "good.png", seed=1)
    write_image(src / "cls" / "captioned.png", seed=2)
    os.mkfifo(src / "cls" / "pipe.png")
    os.mkfifo(src / "cls" / "captioned.txt")

    with deadline(60):  # without the fix, opening a FIFO blocks forever
        result, out = run_extract(src)

    assert FeatureSet.open(out).table().column("key").to_pylist() == ["cls/good.png"]
    rejects = rejects_by_key(out)
    assert {k: category(r["reason"]) for k, r in rejects.items()} == {"cls/pipe.png": "not-a-file",
                                                                       "cls/captioned.png": "not-a-file"}
    assert f"{src / 'cls' / 'pipe.png'} is a FIFO" in rejects["cls/pipe.png"]["reason"]
    assert f"{src / 'cls' / 'captioned.txt'} is a FIFO" in rejects["cls/captioned.png"]["reason"]


def test_dev_zero_is_rejected_without_reading_it(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "good.png", seed=1)
    (src / "zero.png").symlink_to("/dev/zero")
    (src / "t.csv").write_text("image,caption\ngood.png,good\n/dev/zero,named in the table\nzero.png,a link\n")

    with deadline(60):  # without the fix, /dev/zero is read until memory runs out
        _, folder_set = run_extract(src, out=tmp_path / "folder", source_format="imagefolder")
        _, table_set = run_extract(src / "t.csv", out=tmp_path / "table")

    assert category(rejects_by_key(folder_set)["zero.png"]["reason"]) == "outside-root"
    rejects = rejects_by_key(table_set)
    assert rejects["/dev/zero"]["reason"] == "not-a-file: /dev/zero is a character device, not a regular file"
    assert rejects["zero.png"]["reason"] == f"not-a-file: {src / 'zero.png'} is a character device, not a regular file"


def test_files_larger_than_max_file_bytes_are_not_read(tmp_path, run_extract):
    src = tmp_path / "src"
    small = write_image(src / "cls" / "small.png", size=(4, 4), seed=1)
    write_image(src / "cls" / "large.png", size=(64, 64), seed=2)
    write_image(src / "cls" / "long_caption.png", size=(4, 4), seed=3)
    (src / "cls" / "long_caption.txt").write_text("word " * 1000)
    limit = small.stat().st_size

    result, out = run_extract(src, source_options={"max_file_bytes": limit})

    assert FeatureSet.open(out).table().column("key").to_pylist() == ["cls/small.png"]
    rejects = rejects_by_key(out)
    assert rejects["cls/large.png"]["reason"].startswith(f"oversized: {src / 'cls' / 'large.png'} has ")
    assert rejects["cls/long_caption.png"]["reason"] == (f"oversized: {src / 'cls' / 'long_caption.txt'} has 5000 "
                                                         f"bytes, more than --max-file-bytes {limit}")


def test_tar_member_larger_than_max_file_bytes_is_not_read(tmp_path):
    write_img2dataset_shard(tmp_path, 0, [("000000000", "a caption", "success")])
    (record,) = read_source(tmp_path, "img2dataset").records
    with pytest.raises(Rejected, match=r"^oversized: .*00000.tar holds a \d+-byte image, more than --max-file-bytes 100$"):
        load_image(record.ref, 10**8, DEFAULT_MAX_SIDE, 100)


# ---------------------------------------------------------------------------------------------
# images that declare a huge side are rejected from the header, before decoding


def long_png(path: Path, height: int) -> Path:
    Image.new("L", (1, height)).save(path)
    return path


def test_one_pixel_wide_pngs_are_rejected_before_decoding(tmp_path, run_extract):
    src = tmp_path / "src"
    src.mkdir()
    assert long_png(src / "tall.png", 200_000).stat().st_size < 1000
    long_png(src / "taller.png", 2_000_000)
    write_image(src / "good.png", seed=1)

    result, out = run_extract(src)

    assert result.rows == 1
    rejects = rejects_by_key(out)
    assert rejects["tall.png"]["reason"] == f"oversized: 1x200000 pixels has a side longer than --max-side {DEFAULT_MAX_SIDE}"
    assert rejects["taller.png"]["reason"] == f"oversized: 1x2000000 pixels has a side longer than --max-side {DEFAULT_MAX_SIDE}"


PEAK_MEMORY = """
import json, resource, sys
from pipeline.data.crops import CropDataset
from pipeline.data.sources import Record
for path in sys.argv[1:]:
    dataset = CropDataset([Record("k", "", -1, ("file", path), "k")], 16, [32], "crop", 100_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, reason = dataset[0]
    print(json.dumps([reason, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]))
"""


def test_one_pixel_wide_pngs_take_no_memory(tmp_path):
    """The crop of a 1x200000 image would be 16x3200000 pixels even at 16 px: the peak resident
    memory of a process cropping it, as the extractor does, must not grow."""
    files = [long_png(tmp_path / "tall.png", 200_000), long_png(tmp_path / "taller.png", 2_000_000)]
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, *map(str, files)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for line in run.stdout.splitlines():
        reason, grew_kib = json.loads(line)
        assert category(reason) == "oversized", reason
        assert grew_kib < 32 * 1024, f"{reason}: peak memory grew {grew_kib} KiB"


def test_crop_of_a_very_long_image_stays_under_max_pixels():
    img = Image.new("RGB", (1, 4000))
    with pytest.raises(Rejected, match=r"^oversized: 1x4000 pixels resized to 64 px on the short side is 64x256000, "
                                       r"more than --max-pixels 100000$"):
        center_crop(img, 64, max_pixels=100_000)
    assert center_crop(Image.new("RGB", (20, 24)), 16, max_pixels=16 * 20).size == (16, 16)


def test_pil_decompression_bomb_error_is_a_reject(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as a library imported alongside might set it
    with pytest.raises(Rejected, match=r"^oversized: Image size \(480 pixels\) exceeds limit"):
        decode_rgb(encoded(Image.fromarray(random_rgb()), "PNG"))


# ---------------------------------------------------------------------------------------------
# the flags


def test_flags_reach_the_extraction(monkeypatch, tmp_path):
    seen = {}

    def fake_extract(opts, overwrite=False, log=print):
        seen["opts"] = opts
        return JobResult("up-to-date", Path(opts.out), 0, 0)

    monkeypatch.setattr("stages.extract.extract", fake_extract)
    args = ["extract", str(tmp_path), "--out", str(tmp_path / "set"), "--follow-symlinks", "--max-file-bytes", "1000",
            "--max-side", "77"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)

    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    assert opts.max_side == 77
    assert opts.source_options.follow_symlinks is True and opts.source_options.max_file_bytes == 1000
    defaults = CliRunner().invoke(main, ["extract", str(tmp_path), "--out", str(tmp_path / "set")])
    assert defaults.exit_code == 0
    assert seen["opts"].source_options == SourceOptions() and seen["opts"].max_side == DEFAULT_MAX_SIDE
