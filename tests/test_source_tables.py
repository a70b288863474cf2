"""Table sources read row by row (no extraction): keys, captions, labels and image paths, and each
row that cannot be used is a reject naming its row, never a failure."""

from __future__ import annotations

import json

from pipeline.data.sources import SourceOptions, read_source

ROWS = "image,caption,label,id\na.png,first,1,k1\n,no image,2,k2\nb.png,bad label,x,k3\nc.png,,-1,k4\na.png,dup,3,k1\n"


def test_table_rows_with_label_and_key_columns(tmp_path):
    (tmp_path / "t.csv").write_text(ROWS, encoding="utf-8")
    records = read_source(tmp_path / "t.csv", options=SourceOptions(label_column="label", key_column="id")).records
    assert [(r.key, r.caption, r.label, r.ref, r.origin, r.reject) for r in records] == [
        ("k1", "first", 1, ("file", str(tmp_path / "a.png")), "t.csv row 1", None),
        ("k2", "no image", 2, ("file", ""), "t.csv row 2", "bad-row: no image path"),
        ("k3", "bad label", -1, ("file", str(tmp_path / "b.png")), "t.csv row 3",
         "bad-row: label 'x' is not an integer in 0..2**31-1"),
        ("k4", "", -1, ("file", str(tmp_path / "c.png")), "t.csv row 4", None),
        ("k1", "dup", 3, ("file", str(tmp_path / "a.png")), "t.csv row 5", "duplicate-key: 'k1' first seen at t.csv row 1")]


def test_table_keys_default_to_the_image_path_and_templates_fill_captions(tmp_path):
    (tmp_path / "t.csv").write_text(ROWS, encoding="utf-8")
    records = read_source(tmp_path / "t.csv", options=SourceOptions(caption_template="{caption} ({label})")).records
    assert [(r.key, r.caption, r.label, r.reject) for r in records] == [
        ("a.png", "first (1)", -1, None), ("t.csv#2", "no image (2)", -1, "bad-row: no image path"),
        ("b.png", "bad label (x)", -1, None), ("c.png", " (-1)", -1, None),
        ("a.png", "dup (3)", -1, "duplicate-key: 'a.png' first seen at t.csv row 1")]


def test_a_row_the_table_reader_cannot_take_is_a_reject_without_a_label(tmp_path):
    (tmp_path / "t.csv").write_text("image,caption\na.png,x\nb.png,y,extra\n", encoding="utf-8")
    records = read_source(tmp_path / "t.csv").records
    assert [(r.key, r.caption, r.label, r.ref, r.origin, r.reject) for r in records] == [
        ("a.png", "x", -1, ("file", str(tmp_path / "a.png")), "t.csv row 1", None),
        ("t.csv#2", "", -1, ("file", ""), "t.csv row 2", "bad-row: line 3 has more fields than the header")]


def test_json_labels_must_be_int32_integers_not_booleans_or_fractions(tmp_path):
    rows = [{"image": "a.png", "label": True}, {"image": "b.png", "label": 3.7}, {"image": "c.png", "label": 3.0},
            {"image": "d.png", "label": 4}, {"image": "e.png", "label": 2 ** 31 - 1}, {"image": "f.png", "label": 2 ** 31}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({**r, "caption": "x"}) + "\n" for r in rows), encoding="utf-8")
    records = read_source(tmp_path / "t.jsonl", options=SourceOptions(label_column="label")).records
    assert [(r.key, r.label, r.reject) for r in records] == [
        ("a.png", -1, "bad-row: label True is not an integer in 0..2**31-1"),
        ("b.png", -1, "bad-row: label 3.7 is not an integer in 0..2**31-1"),
        ("c.png", 3, None), ("d.png", 4, None), ("e.png", 2 ** 31 - 1, None),
        ("f.png", -1, "bad-row: label 2147483648 is not an integer in 0..2**31-1")]
