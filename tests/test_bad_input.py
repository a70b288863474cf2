"""Bad input ends up in rejects.jsonl with a categorised reason; odd but valid images are converted."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from pipeline.data.featureset import FeatureSet
from pipeline.data.images import DEFAULT_MAX_PIXELS, Rejected, decode_rgb
from pipeline.data.sources import SourceError
from pipeline.data.jobs import JobError

MAX_PIXELS = 1000  # the good test images are 20x24 = 480 pixels


def random_rgb(seed=0, size=(20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny file whose header claims a huge greyscale image (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def write_bad_files(src: Path) -> None:
    """The file-level bad inputs, each under a name that says what it is."""
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(99)
    jpg = encoded(Image.fromarray(random_rgb(5)), "JPEG")
    png = encoded(Image.fromarray(random_rgb(6)), "PNG")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(600))   # JPEG signature, garbage after
    (src / "random.jpg").write_bytes(rng.bytes(600))                          # random bytes, .jpg name
    (src / "truncated.jpg").write_bytes(jpg[:len(jpg) // 2])
    (src / "truncated.png").write_bytes(png[:len(png) // 2])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notimage.png").write_text("this is a text file, not a PNG\n")
    write_image(src / "big.png", size=(100, 100), seed=7)                      # 10000 pixels > MAX_PIXELS
    (src / "bomb.png").write_bytes(bomb_png())


def rejects_by_key(out) -> dict[str, dict]:
    rejects = FeatureSet.open(out).rejects()
    by_key = {r["key"]: r for r in rejects}
    assert len(by_key) == len(rejects), f"two rejects share a key: {rejects}"
    for r in rejects:
        assert set(r) == {"key", "origin", "reason"}, r
        assert ": " in r["reason"], f"reason is not '<category>: <detail>': {r['reason']!r}"
    return by_key


def category(reason: str) -> str:
    return reason.split(":", 1)[0]


def assert_counts_match(out, expected: dict[str, int]):
    fs = FeatureSet.open(out)
    rejects = fs.rejects()
    assert Counter(category(r["reason"]) for r in rejects) == Counter(expected)
    assert fs.manifest["rejects"]["by_reason"] == expected
    assert fs.manifest["rejects"]["total"] == len(rejects) == sum(expected.values())
    assert fs.manifest["rejects"]["file"] == "rejects.jsonl"


# ---------------------------------------------------------------------------------------------
# a table mixing good rows with every kind of bad one


def test_table_with_bad_rows(tmp_path, run_extract):
    src = tmp_path / "src"
    write_bad_files(src)
    for i in range(1, 5):
        write_image(src / f"good{i}.png", seed=i)
    lines = [b"image,caption",
             b"good1.png,first good image",
             b"corrupt.jpg,garbage after a JPEG signature",
             b"random.jpg,random bytes",
             b"good2.png,second good image",
             b"truncated.jpg,half a JPEG",
             b"truncated.png,half a PNG",
             b"empty.jpg,no bytes",
             b"notimage.png,a text file",
             b"nope/missing.png,a file that does not exist",
             b"big.png,too many pixels",
             b"bomb.png,a decompression bomb header",
             b"good4.png,caption with bad bytes \xff\xfe here",
             b"caf\xe9.png,latin-1 file name",
             b"good1.png,the same key again",
             b"good3.png,third good image"]
    (src / "t.csv").write_bytes(b"\n".join(lines) + b"\n")

    result, out = run_extract(src / "t.csv", max_pixels=MAX_PIXELS)

    fs = FeatureSet.open(out)
    t = fs.table()
    assert list(zip(t.column("key").to_pylist(), t.column("caption").to_pylist())) == [
        ("good1.png", "first good image"), ("good2.png", "second good image"), ("good3.png", "third good image")]
    assert result.rows == fs.rows == 3 and result.rejects == 12

    rejects = rejects_by_key(out)
    expected = {"corrupt.jpg": ("corrupt", 3), "random.jpg": ("not-an-image", 4),
                "truncated.jpg": ("corrupt", 6), "truncated.png": ("corrupt", 7),
                "empty.jpg": ("empty", 8), "notimage.png": ("not-an-image", 9),
                "nope/missing.png": ("missing", 10), "big.png": ("oversized", 11),
                "bomb.png": ("oversized", 12), "good4.png": ("bad-utf8", 13),
                "caf\ufffd.png": ("bad-utf8", 14), "good1.png": ("duplicate-key", 15)}
    # rows are numbered from 1 after the header
    assert set(rejects) == set(expected), sorted(rejects)
    for key, (cat, row) in expected.items():
        r = rejects[key]
        assert category(r["reason"]) == cat, f"{key}: expected {cat}, got {r['reason']!r}"
        assert r["origin"] == f"t.csv row {row - 1}", r
    # the details name what went wrong
    assert str(src / "nope" / "missing.png") in rejects["nope/missing.png"]["reason"]
    assert "100x100" in rejects["big.png"]["reason"] and str(MAX_PIXELS) in rejects["big.png"]["reason"]
    assert "100000x100000" in rejects["bomb.png"]["reason"]
    assert "caption" in rejects["good4.png"]["reason"]
    assert "key" in rejects["caf\ufffd.png"]["reason"]
    assert "'good1.png'" in rejects["good1.png"]["reason"] and "t.csv row 1" in rejects["good1.png"]["reason"]
    # the rejects come in input order
    assert [r["key"] for r in fs.rejects()] == sorted(expected, key=lambda k: expected[k][1])
    assert_counts_match(out, {"corrupt": 3, "not-an-image": 2, "empty": 1, "missing": 1, "oversized": 2,
                              "bad-utf8": 2, "duplicate-key": 1})


# ---------------------------------------------------------------------------------------------
# the same file-level problems in an image folder, and in conversation JSON


def test_imagefolder_with_bad_files(tmp_path, run_extract):
    src = tmp_path / "src"
    write_bad_files(src / "junk")
    good = ["cls/a.png", "cls/b.jpg", "junk/fine.png", "cls/edge.png"]
    for i, name in enumerate(good[:3]):
        write_image(src / name, seed=i)
    write_image(src / "cls" / "edge.png", size=(25, 40), seed=3)   # exactly MAX_PIXELS: allowed
    write_image(src / "cls" / "badcap.png", seed=4)
    (src / "cls" / "badcap.txt").write_bytes(b"caption \xc3\x28 broken")

    result, out = run_extract(src, max_pixels=MAX_PIXELS)

    fs = FeatureSet.open(out)
    assert sorted(fs.table().column("key").to_pylist()) == sorted(good)
    expected = {"junk/corrupt.jpg": "corrupt", "junk/random.jpg": "not-an-image", "junk/truncated.jpg": "corrupt",
                "junk/truncated.png": "corrupt", "junk/empty.jpg": "empty", "junk/notimage.png": "not-an-image",
                "junk/big.png": "oversized", "junk/bomb.png": "oversized", "cls/badcap.png": "bad-utf8"}
    rejects = rejects_by_key(out)
    assert {k: category(r["reason"]) for k, r in rejects.items()} == expected
    for key, r in rejects.items():
        assert r["origin"] == key, r  # an image folder's origin is the file's path in it
    assert "badcap.txt" in rejects["cls/badcap.png"]["reason"]
    assert_counts_match(out, {"corrupt": 3, "not-an-image": 2, "empty": 1, "oversized": 2, "bad-utf8": 1})
    assert result.rows == 4 and result.rejects == 9


def test_conversations_with_bad_items(tmp_path, run_extract):
    src = tmp_path / "src"
    write_bad_files(src / "junk")
    write_image(src / "a" / "x.png", seed=1)
    write_image(src / "b" / "x.png", seed=2)

    def item(prompt, *images):
        return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<|image|>"}],
                "image": list(images)}

    items = [item("good a", "a/x.png"), item("empty", "junk/empty.jpg"), item("gone", "c/x.png"),
             item("BADPROMPT", "b/x.png"), item("two images", "a/x.png", "b/x.png"),
             item("again", "a/x.png"), item("truncated", "junk/truncated.png")]
    text = json.dumps(items).encode("utf-8").replace(b"BADPROMPT", b"bad \xff prompt")
    (src / "data.json").write_bytes(text)

    result, out = run_extract(src / "data.json", max_pixels=MAX_PIXELS)

    fs = FeatureSet.open(out)
    assert fs.table().column("key").to_pylist() == ["a/x.png"]
    got = [(r["key"], r["origin"], category(r["reason"])) for r in fs.rejects()]
    assert got == [("junk/empty.jpg", "data.json item 1", "empty"),
                   ("c/x.png", "data.json item 2", "missing"),
                   ("b/x.png", "data.json item 3", "bad-utf8"),
                   ("data.json#4", "data.json item 4", "bad-row"),
                   ("a/x.png", "data.json item 5", "duplicate-key"),
                   ("junk/truncated.png", "data.json item 6", "corrupt")]
    assert str(src / "c" / "x.png") in fs.rejects()[1]["reason"]
    assert "data.json item 0" in fs.rejects()[4]["reason"]
    assert_counts_match(out, {"empty": 1, "missing": 1, "bad-utf8": 1, "bad-row": 1, "duplicate-key": 1,
                              "corrupt": 1})


def test_only_bad_input_gives_an_empty_set(tmp_path, run_extract):
    src = tmp_path / "src"
    (src / "cls").mkdir(parents=True)
    (src / "cls" / "empty.png").write_bytes(b"")
    (src / "cls" / "text.jpg").write_text("hello")

    result, out = run_extract(src)

    fs = FeatureSet.open(out)
    assert result.rows == fs.rows == 0 and fs.table().num_rows == 0
    assert {r["key"]: category(r["reason"]) for r in fs.rejects()} == {"cls/empty.png": "empty",
                                                                       "cls/text.jpg": "not-an-image"}
    assert fs.verify() == []


# ---------------------------------------------------------------------------------------------
# odd but valid images are converted, not rejected


def mode_images() -> dict[str, bytes]:
    rgb = Image.fromarray(random_rgb(11))
    rgba = np.dstack([random_rgb(12), np.where(np.arange(20)[None, :] < 10, 0, 255).repeat(24, 0)]).astype(np.uint8)
    palette_t = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    grey16 = (np.random.default_rng(13).integers(0, 65536, (24, 20))).astype(np.uint16)
    assert Image.fromarray(grey16).mode == "I;16"
    la = Image.fromarray(random_rgb(14)).convert("LA")
    la.putalpha(Image.fromarray(np.where(np.arange(24)[:, None] < 12, 0, 255).repeat(20, 1).astype(np.uint8)))
    return {"cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
            "grey16.png": encoded(Image.fromarray(grey16), "PNG"),
            "palette.png": encoded(rgb.convert("P", palette=Image.ADAPTIVE, colors=32), "PNG"),
            "palette_transparent.png": encoded(palette_t, "PNG", transparency=0),
            "rgba.png": encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
            "la.png": encoded(la, "PNG"),
            "grey.png": encoded(rgb.convert("L"), "PNG"),
            "grey.jpg": encoded(rgb.convert("L"), "JPEG"),
            "bilevel.png": encoded(rgb.convert("1"), "PNG"),
            "rgb.webp": encoded(rgb, "WEBP"),
            "rgb.gif": encoded(rgb, "GIF"),
            "rgb.bmp": encoded(rgb, "BMP"),
            "rgb.tiff": encoded(rgb, "TIFF")}


def test_odd_modes_are_converted_and_extracted(tmp_path, run_extract):
    src = tmp_path / "src"
    src.mkdir()
    files = mode_images()
    expected_modes = {"cmyk.jpg": "CMYK", "grey16.png": "I;16", "palette.png": "P", "palette_transparent.png": "P",
                      "rgba.png": "RGBA", "la.png": "LA", "grey.png": "L", "grey.jpg": "L", "bilevel.png": "1"}
    for name, data in files.items():
        (src / name).write_bytes(data)
        if name in expected_modes:
            assert Image.open(src / name).mode == expected_modes[name], name   # the test input is what it says
        decoded = decode_rgb(data)
        assert decoded.mode == "RGB" and decoded.size == (20, 24), name

    result, out = run_extract(src)

    fs = FeatureSet.open(out)
    assert fs.rejects() == [], f"valid images were rejected: {fs.rejects()}"
    assert sorted(fs.table().column("key").to_pylist()) == sorted(files)
    assert result.rows == len(files) and fs.manifest["rejects"]["by_reason"] == {}


def test_conversions_give_the_expected_pixels():
    # transparent pixels become white; opaque ones keep their colour
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)
    rgba[0, 1] = (10, 20, 30, 255)
    rgba[1, 0] = (200, 100, 0, 128)
    got = np.asarray(decode_rgb(encoded(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == [10, 20, 30]
    assert np.abs(got[1, 0].astype(int) - [227, 177, 127]).max() <= 1
    # LA: the same for greyscale with alpha
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA")
    assert np.asarray(decode_rgb(encoded(la, "PNG")))[0].tolist() == [[255, 255, 255], [50, 50, 50]]
    # palette with a transparent index
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    p.putdata([0, 1])
    assert np.asarray(decode_rgb(encoded(p, "PNG", transparency=0)))[0].tolist() == [[255, 255, 255], [9, 8, 7]]
    # 16-bit greyscale is scaled from 0..65535 to 0..255, also when all values are small
    g16 = np.array([[0, 257, 32768, 65535, 200]], np.uint16)
    assert np.asarray(decode_rgb(encoded(Image.fromarray(g16), "PNG")))[0, :, 0].tolist() == [0, 1, 128, 255, 1]
    dark = np.array([[0, 100, 255]], np.uint16)
    assert np.asarray(decode_rgb(encoded(Image.fromarray(dark), "PNG")))[0, :, 0].tolist() == [0, 0, 1]
    # greyscale L becomes three equal channels
    grey = np.array([[0, 77, 255]], np.uint8)
    assert np.asarray(decode_rgb(encoded(Image.fromarray(grey), "PNG")))[0].tolist() == [[0] * 3, [77] * 3, [255] * 3]
    # CMYK: pure cyan, magenta, yellow, black
    cmyk = Image.fromarray(np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    assert np.asarray(decode_rgb(encoded(cmyk, "TIFF")))[0].tolist() == [[0, 255, 255], [255, 0, 255],
                                                                          [255, 255, 0], [0, 0, 0]]


def test_converted_images_extract_like_their_rgb_equivalent(tmp_path, run_extract):
    """An RGBA image gives the same codes as its white-composited RGB version; L and 16-bit grey the
    same as the RGB image with three equal channels."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(21)
    colour = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    alpha = np.where(rng.random((24, 20)) < 0.3, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(src / "a_rgba.png")
    flat = np.where(alpha[..., None] == 0, 255, colour).astype(np.uint8)
    Image.fromarray(flat).save(src / "a_flat.png")
    grey = rng.integers(0, 256, (24, 20), dtype=np.uint8)
    Image.fromarray(grey, "L").save(src / "b_grey.png")
    Image.fromarray((grey.astype(np.uint16) * 257)).save(src / "b_grey16.png")
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(src / "b_rgb.png")

    result, out = run_extract(src)

    t = FeatureSet.open(out).table()
    codes = dict(zip(t.column("key").to_pylist(), t.column("codes").to_pylist()))
    assert len(codes) == 5
    assert codes["a_rgba.png"] == codes["a_flat.png"]
    assert codes["b_grey.png"] == codes["b_rgb.png"] == codes["b_grey16.png"]
    assert codes["a_flat.png"] != codes["b_rgb.png"]


def test_decompression_bomb_header_is_rejected_before_decoding():
    data = bomb_png(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(Rejected, match=r"^oversized: 100000x100000 pixels is more than --max-pixels"):
        decode_rgb(data)                    # the default limit
    assert 100_000 * 100_000 > DEFAULT_MAX_PIXELS
    with pytest.raises(Rejected, match=r"^oversized: 20x24 pixels is more than --max-pixels 479$"):
        decode_rgb(encoded(Image.fromarray(random_rgb()), "PNG"), max_pixels=479)
    assert decode_rgb(encoded(Image.fromarray(random_rgb()), "PNG"), max_pixels=480).size == (20, 24)


# ---------------------------------------------------------------------------------------------
# --max-reject-rate


def test_max_reject_rate(tmp_path, run_extract):
    src = tmp_path / "src"
    for i in range(3):
        write_image(src / f"good{i}.png", seed=i)
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("not an image")
    out = tmp_path / "set"

    with pytest.raises(JobError) as exc:
        run_extract(src, out=out, max_reject_rate=0.25)
    msg = str(exc.value)
    assert "2 of 5" in msg and "40.0%" in msg and "25.0%" in msg, msg
    assert str(out / "rejects.jsonl") in msg, msg
    assert "'empty': 1" in msg and "'not-an-image': 1" in msg, msg
    assert not (out / "manifest.json").exists()
    assert [json.loads(line)["key"] for line in (out / "rejects.jsonl").read_text().splitlines()] == ["empty.png", "text.png"]

    # a rate exactly at the limit is accepted (re-running the same job finishes it)
    result, _ = run_extract(src, out=out, max_reject_rate=0.4)
    assert (result.rows, result.rejects) == (3, 2)
    assert FeatureSet.open(out).manifest["rejects"]["by_reason"] == {"empty": 1, "not-an-image": 1}


# ---------------------------------------------------------------------------------------------
# malformed rows must be rejects, never a crash (these found bugs; see each assertion message)


def extract_or_fail(run_extract, source, where: str, **kw):
    try:
        return run_extract(source, **kw)
    except (UnicodeError, TypeError, AttributeError, OverflowError, ValueError) as exc:
        pytest.fail(f"BUG in {where}: extraction crashed with {type(exc).__name__}: {exc} "
                    "instead of writing the bad record to rejects.jsonl")


def test_non_utf8_file_names_in_an_image_folder_are_rejected(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "cls" / "ok.png", seed=1)
    raw_dir = bytes(src / "cls")
    write_image(Path(os.fsdecode(raw_dir + b"/caf\xe9.png")), seed=2)  # latin-1 name
    Path(os.fsdecode(raw_dir + b"/bad\xff.png")).write_bytes(b"")

    _, out = extract_or_fail(run_extract, src, "pipeline/data/sources.py _read_imagefolder (key from a non-UTF-8 file name)")

    fs = FeatureSet.open(out)
    assert fs.table().column("key").to_pylist() == ["cls/ok.png"]
    got = sorted((r["key"], category(r["reason"])) for r in fs.rejects())
    assert got == [("cls/bad\ufffd.png", "bad-utf8"), ("cls/caf\ufffd.png", "bad-utf8")], got


def test_non_utf8_image_path_in_conversations_is_rejected(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "ok.png", seed=1)
    write_image(Path(os.fsdecode(bytes(src) + b"/caf\xe9.png")), seed=2)
    items = [{"conversations": [{"from": "human", "value": "good"}], "image": ["ok.png"]},
             {"conversations": [{"from": "human", "value": "latin-1 path"}], "image": ["CAFE"]}]
    (src / "data.json").write_bytes(json.dumps(items).encode().replace(b"CAFE", b"caf\xe9.png"))

    _, out = extract_or_fail(run_extract, src / "data.json",
                             "pipeline/data/sources.py _read_conversations (key from a non-UTF-8 image path)")

    fs = FeatureSet.open(out)
    assert fs.table().column("key").to_pylist() == ["ok.png"]
    assert [(r["key"], r["origin"], category(r["reason"])) for r in fs.rejects()] == [
        ("caf\ufffd.png", "data.json item 1", "bad-utf8")]


def test_malformed_conversation_items_and_jsonl_lines_are_bad_rows(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "a.png", seed=1)
    write_image(src / "b.png", seed=2)
    items = [{"conversations": [{"from": "human", "value": "good"}], "image": ["a.png"]},
             {"conversations": [{"from": "human", "value": "null image"}], "image": [None]},
             {"conversations": [{"from": "human", "value": "number image"}], "image": [17]},
             {"conversations": None, "image": ["b.png"]}]
    (src / "data.json").write_text(json.dumps(items))

    _, out = extract_or_fail(run_extract, src / "data.json",
                             "pipeline/data/sources.py _read_conversations (image entry not a string / conversations null)")

    fs = FeatureSet.open(out)
    rejects = {r["origin"]: category(r["reason"]) for r in fs.rejects()}
    assert rejects.get("data.json item 1") == "bad-row" and rejects.get("data.json item 2") == "bad-row", rejects
    keys = fs.table().column("key").to_pylist()
    # "conversations": null is an item without a prompt: either extracted with an empty caption or a bad row
    assert keys in (["a.png", "b.png"], ["a.png"]), keys
    assert (keys == ["a.png", "b.png"]) != (rejects.get("data.json item 3") == "bad-row"), (keys, rejects)

    (src / "t.jsonl").write_text('{"image": "a.png", "caption": "good"}\n[1, 2]\n"just a string"\n'
                                 '{"image": "b.png", "caption": "also good"}\n')
    _, out = extract_or_fail(run_extract, src / "t.jsonl", "pipeline/data/sources.py _read_table (JSONL line not an object)",
                             out=tmp_path / "set2")
    fs = FeatureSet.open(out)
    assert fs.table().column("key").to_pylist() == ["a.png", "b.png"]
    assert [(r["origin"], category(r["reason"])) for r in fs.rejects()] == [("t.jsonl row 2", "bad-row"),
                                                                            ("t.jsonl row 3", "bad-row")]


def test_csv_row_with_extra_fields_is_a_bad_row_not_a_truncated_caption(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "a.png", seed=1)
    write_image(src / "b.png", seed=2)
    (src / "t.csv").write_text("image,caption\na.png,a photo\nb.png,a photo, with an unquoted comma\n")

    _, out = extract_or_fail(run_extract, src / "t.csv", "pipeline/data/sources.py _table_rows (CSV row longer than the header)")

    fs = FeatureSet.open(out)
    t = fs.table()
    assert "a photo" not in t.column("caption").to_pylist()[1:], (
        "BUG pipeline/data/sources.py _table_rows: the CSV row 'b.png,a photo, with an unquoted comma' has 3 fields for a "
        "2-column header; csv.DictReader puts the extra field under key None and the caption is silently cut to "
        f"'a photo'. Got rows {t.select(['key', 'caption']).to_pylist()}, rejects {fs.rejects()}")
    assert t.column("key").to_pylist() == ["a.png"]
    assert [(r["origin"], category(r["reason"])) for r in fs.rejects()] == [("t.csv row 2", "bad-row")]

    # and a missing named column is still a SourceError naming it (not a TypeError sorting None with str)
    try:
        with pytest.raises(SourceError, match="'nope'"):
            run_extract(src / "t.csv", out=tmp_path / "set2", source_options=dict(label_column="nope"))
    except TypeError as exc:
        pytest.fail(f"BUG pipeline/data/sources.py _read_table: sorted(columns) fails on the None column of a long CSV "
                    f"row: {exc}")


def test_label_outside_int32_is_a_bad_row(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "a.png", seed=1)
    write_image(src / "b.png", seed=2)
    write_image(src / "c.png", seed=3)
    (src / "t.csv").write_text("image,caption,label\na.png,x,3\nb.png,y,99999999999\nc.png,z,seven\n")

    _, out = extract_or_fail(run_extract, src / "t.csv", "pipeline/data/sources.py _read_table (label beyond int32)",
                             source_options=dict(label_column="label"))

    fs = FeatureSet.open(out)
    assert fs.table().select(["key", "label"]).to_pylist() == [{"key": "a.png", "label": 3}]
    rejects = fs.rejects()
    assert [(r["key"], category(r["reason"])) for r in rejects] == [("b.png", "bad-row"), ("c.png", "bad-row")]
    assert "99999999999" in rejects[0]["reason"] and "'seven'" in rejects[1]["reason"]


# ---------------------------------------------------------------------------------------------
# one row's problem is that row's reject; a source that cannot be read right is refused by name


def idx_file(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())
    return path


def test_rows_the_readers_cannot_take_are_rejects_not_failures(tmp_path):
    from pipeline.data.sources import CSV_FIELD_LIMIT, SourceOptions, read_source
    long = "x" * 200_000  # over the csv module's default field limit of 128 KiB
    huge = "y" * (CSV_FIELD_LIMIT + 1)
    (tmp_path / "t.csv").write_text(f"image,caption\na.png,{long}\nb.png,{huge}\nc.png,fine\n")
    records = read_source(str(tmp_path / "t.csv"), None, SourceOptions()).records
    assert [(r.key, len(r.caption), r.reject) for r in records if r.key != "t.csv#2"] == [
        ("a.png", 200_000, None), ("c.png", 4, None)]
    bad = next(r for r in records if r.key == "t.csv#2")
    assert bad.origin == "t.csv row 2" and bad.reject.startswith("bad-row: field larger than field limit")

    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "caption": ["a", "list"]}\n{"image": "b.png", "caption": 7}\n')
    records = read_source(str(tmp_path / "t.jsonl"), None, SourceOptions()).records
    assert [(r.caption, r.reject) for r in records] == [("", "bad-row: caption is a JSON list, not text"), ("7", None)]

    conversation = [{"conversations": [{"from": "human", "value": {"text": "a dict"}}], "image": ["a.png"]}]
    (tmp_path / "c.json").write_text(json.dumps(conversation))
    record, = read_source(str(tmp_path / "c.json"), None, SourceOptions()).records
    assert (record.caption, record.reject) == ("", "bad-row: prompt is a JSON dict, not text")

    fm = tmp_path / "fm"
    fm.mkdir()
    idx_file(fm / "t10k-images-idx3-ubyte", np.zeros((3, 2, 2)))
    idx_file(fm / "t10k-labels-idx1-ubyte", np.array([1, 12, 9]))
    records = read_source(str(fm), None, SourceOptions(split="test")).records
    assert [(r.label, r.reject) for r in records] == [
        (1, None), (-1, "bad-row: label 12 is not a Fashion-MNIST class (0..9)"), (9, None)]


def test_sources_that_cannot_be_read_right_are_refused(tmp_path):
    from pipeline.data.sources import SourceOptions, read_source
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(SourceError, match="c.json: the list of conversation items is empty"):
        read_source(str(tmp_path / "c.json"), None, SourceOptions())
    idx_file(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 4)))
    idx_file(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 3]))
    with pytest.raises(SourceError, match=r"t10k-images-idx3-ubyte: holds 2-d data \[3, 4\]; it must be 3-d"):
        read_source(str(tmp_path), None, SourceOptions(split="test"))


# ---------------------------------------------------------------------------------------------
# what only the models or several rows reveal


def solid(path: Path, value: int) -> Path:
    Image.fromarray(np.full((24, 20, 3), value, np.uint8)).save(path)
    return path


def test_rows_with_non_finite_teacher_features_are_rejects_not_rows(tmp_path, run_extract, monkeypatch):
    """A teacher that gives NaN, inf, or a value float16 cannot hold for an image: that image is a
    `non-finite-feature` reject, its batch's other rows are kept, and the set reads back clean."""
    from pipeline.models.teachers import Teacher
    forward = Teacher.forward

    def poisoned(self, images):  # black images give NaN, white inf, grey 128 a value beyond float16
        out = forward(self, images)
        image = lambda value: (images.reshape(len(images), -1) == value).all(1, keepdim=True)  # noqa: E731
        first = torch.arange(out.shape[1]) == 0
        out = torch.where(image(0), torch.nan, out)
        out = torch.where(image(255), torch.inf, out)
        return torch.where(image(128) & first, 1e6, out)
    monkeypatch.setattr(Teacher, "forward", poisoned)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_image(src / f"good{i}.png", seed=i)
    solid(src / "black.png", 0), solid(src / "white.png", 255), solid(src / "grey.png", 128)

    result, out = run_extract(src, batch_size=8)

    fs = FeatureSet.open(out)
    assert fs.table().column("key").to_pylist() == ["good0.png", "good1.png", "good2.png"]
    assert {r["key"]: r["reason"] for r in fs.rejects()} == {
        "black.png": "non-finite-feature: teacher efficientnet-lite0 gave NaN",
        "grey.png": "non-finite-feature: teacher efficientnet-lite0 gave values beyond float16's range",
        "white.png": "non-finite-feature: teacher efficientnet-lite0 gave inf"}
    assert_counts_match(out, {"non-finite-feature": 3})
    assert (result.rows, result.rejects) == (3, 3) and fs.verify() == []
    assert fs.manifest["feature_stats"]["efficientnet-lite0"]["nonfinite_rows"] == 0


def test_a_row_rejected_on_decoding_does_not_take_a_good_rows_key(tmp_path, run_extract):
    """The source marks later rows with a key as duplicates of the first; when the first cannot be
    decoded, the first later one that can holds the key, and the rest are its duplicates, even
    when they sit in other shards."""
    src = tmp_path / "src"
    write_bad_files(src)
    write_image(src / "a.png", seed=1)
    write_image(src / "b.png", seed=2)
    write_image(src / "c.png", seed=3)
    (src / "t.csv").write_text("id,image,caption\n"
                               "k,corrupt.jpg,the first with k cannot be decoded\n"
                               "k,empty.jpg,nor the second\n"
                               "other,c.png,a row in between\n"
                               "k,a.png,the first good one holds k\n"
                               "k,b.png,a duplicate of that one\n")

    result, out = run_extract(src / "t.csv", shard_size=2, source_options=dict(key_column="id"))

    fs = FeatureSet.open(out)
    t = fs.table()
    assert list(zip(t.column("key").to_pylist(), t.column("caption").to_pylist())) == [
        ("other", "a row in between"), ("k", "the first good one holds k")]
    assert [(r["origin"], r["reason"].split(":")[0]) for r in fs.rejects()] == [
        ("t.csv row 1", "corrupt"), ("t.csv row 2", "empty"), ("t.csv row 5", "duplicate-key")]
    assert fs.rejects()[2]["reason"] == "duplicate-key: 'k' first seen at t.csv row 4"
    assert (result.rows, result.rejects) == (2, 3)


# ---------------------------------------------------------------------------------------------
# every class of input the adversarial run tried, each with what happens to it. Covered elsewhere
# and not repeated here: corrupt, truncated, empty, non-image, missing, oversized and bomb files,
# odd modes, captions and file names that are not UTF-8, duplicate keys, malformed rows and lines
# (above); FIFOs, devices, links leading out, files over --max-file-bytes, 1-pixel-wide images
# (test_hostile_files.py); numeric flags out of range (test_cli_flags.py).


def frames(fmt: str, n: int = 3, **kw) -> bytes:
    """An animated (or multi-page) image of n different frames."""
    images = [Image.fromarray(random_rgb(20 + i)) for i in range(n)]
    return encoded(images[0], fmt, save_all=True, append_images=images[1:], **kw)


def csv_of(rows: list[str], header: str = "image,caption") -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def tar_with(members: dict[str, bytes | str]) -> bytes:
    """A tar of these members; a str value makes the member a symlink to it."""
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def img2dataset(members: dict[str, bytes | str], keys: list[str]):
    """Writes an img2dataset folder: 00000.tar of `members` and 00000.parquet naming `keys`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "00000.tar").write_bytes(tar_with(members))
        pq.write_table(pa.table({"key": keys, "caption": [f"caption {k}" for k in keys], "status": ["success"] * len(keys)}),
                       folder / "00000.parquet")
    return write


PNG = encoded(Image.fromarray(random_rgb(30)), "PNG")
LONG = "a long report " * 10_000  # 140 KB: over the csv module's default field limit of 128 KiB

# name: (files to write {relative path: bytes or a writer}, source (relative), extract options, expected outcome)
# outcome: ("row", key, caption) extracted | ("reject", key, category) | ("refused", message regex)
CLASSES = {
    "animated GIF: first frame": ({"x/anim.gif": frames("GIF")}, "x", {}, ("row", "anim.gif", "")),
    "animated PNG: first frame": ({"x/anim.png": frames("PNG")}, "x", {}, ("row", "anim.png", "")),
    "animated WebP: first frame": ({"x/anim.webp": frames("WEBP", lossless=True)}, "x", {}, ("row", "anim.webp", "")),
    "multi-page TIFF: first page": ({"x/pages.tif": frames("TIFF")}, "x", {}, ("row", "pages.tif", "")),
    "header larger than --max-side": ({"x/tall.png": bomb_png(1, 20_000)}, "x", {}, ("reject", "tall.png", "oversized")),
    "file name with spaces, a newline, quotes and non-ASCII": (
        {"x/c/a b\n'\"é😀.png": PNG}, "x", {}, ("row", "c/a b\n'\"é😀.png", "c")),
    "caption with a NUL, control characters and newlines": (
        {"t.csv": csv_of(['a.png,"line 1\nline 2\x00\x07\ttab"']), "a.png": PNG}, "t.csv", {},
        ("row", "a.png", "line 1\nline 2\x00\x07\ttab")),
    "caption of only whitespace": ({"t.csv": csv_of(["a.png,   "]), "a.png": PNG}, "t.csv", {}, ("row", "a.png", "   ")),
    "CSV caption over 128 KiB": ({"t.csv": csv_of([f"a.png,{LONG}"]), "a.png": PNG}, "t.csv", {}, ("row", "a.png", LONG)),
    "JSONL caption a number: its text": (
        {"t.jsonl": b'{"image": "a.png", "caption": 7}\n', "a.png": PNG}, "t.jsonl", {}, ("row", "a.png", "7")),
    "JSONL caption true": ({"t.jsonl": b'{"image": "a.png", "caption": true}\n', "a.png": PNG}, "t.jsonl", {},
                           ("reject", "a.png", "bad-row")),
    "JSONL label 3.7": ({"t.jsonl": b'{"image": "a.png", "caption": "x", "label": 3.7}\n', "a.png": PNG}, "t.jsonl",
                        {"source_options": {"label_column": "label"}}, ("reject", "a.png", "bad-row")),
    "JSONL label true": ({"t.jsonl": b'{"image": "a.png", "caption": "x", "label": true}\n', "a.png": PNG}, "t.jsonl",
                         {"source_options": {"label_column": "label"}}, ("reject", "a.png", "bad-row")),
    "JSONL image path a list": ({"t.jsonl": b'{"image": ["a.png"], "caption": "x"}\n', "a.png": PNG}, "t.jsonl", {},
                                ("reject", "", "bad-row")),
    "conversation image path a number": (
        {"c.json": b'[{"conversations": [{"from": "human", "value": "x"}], "image": [7]}]'}, "c.json", {},
        ("reject", "c.json#0", "bad-row")),
    "tar member named ../../x: read from the tar, nothing written": (
        {"d": img2dataset({"../../000001.png": PNG}, ["000001"])}, "d", {}, ("row", "000001", "caption 000001")),
    "tar member that is a link: not read": ({"d": img2dataset({"000001.png": "/etc/passwd"}, ["000001"])}, "d", {},
                                            ("reject", "000001", "missing")),
    "empty image folder": ({"x/.keep": b""}, "x", {}, ("refused", r"x: no files found in this image folder")),
    "CSV with a header only": ({"t.csv": b"image,caption\n"}, "t.csv", {}, ("refused", r"t.csv: the table has no rows")),
    "empty JSONL file": ({"t.jsonl": b""}, "t.jsonl", {}, ("refused", r"t.jsonl: the table has no rows")),
    "conversation JSON that is an object": ({"c.json": b'{"image": "a.png"}'}, "c.json", {},
                                            ("refused", r"c.json: expected a JSON list of conversation items, got dict")),
    "img2dataset folder without parquet": ({"d/00000.tar": tar_with({"000001.png": PNG})}, "d",
                                           {"source_format": "img2dataset"},
                                           ("refused", r"00000.tar: no 00000.parquet beside it")),
}


def write_class(src: Path, files: dict) -> None:
    for name, data in files.items():
        path = src / name
        if callable(data):
            data(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_class_of_bad_input_is_converted_rejected_or_refused(name, tmp_path, run_extract):
    files, source, options, (outcome, *expected) = CLASSES[name]
    src = tmp_path / "src"
    write_class(src, files)
    out = tmp_path / "set"

    if outcome == "refused":
        with pytest.raises((SourceError, JobError), match=expected[0]):
            run_extract(src / source, out=out, **options)
        assert not (out / "shards").exists() and not (out / "progress").exists()  # before any work
        return
    run_extract(src / source, out=out, **options)
    fs = FeatureSet.open(out)
    rows = fs.table().select(["key", "caption"]).to_pylist()
    if outcome == "row":
        key, caption = expected
        assert rows == [{"key": key, "caption": caption}] and fs.rejects() == [], (rows, fs.rejects())
    else:
        key, cat = expected
        assert rows == [] and [(r["key"], category(r["reason"])) for r in fs.rejects()] == [(key, cat)], fs.rejects()
    assert sorted(tmp_path.iterdir()) == [out, src] and fs.verify() == []  # nothing written anywhere else
