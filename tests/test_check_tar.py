"""`check_tar`, what every reader and verify run on a tar before using a row, on hand-made tars:
each damage is named with the file, and bytes known to be wrong are never parsed."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pyarrow as pa

from pipeline.data.featureset import check_tar, fixed_list, schema_fields


def arrow(keys: list[str], feats: np.ndarray) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(keys, pa.string()), fixed_list(feats, pa.float16())],
                                      names=["key", "feat.t"])


def write_tar(path, batches: list[pa.RecordBatch], others: dict[str, bytes] | None = None) -> dict:
    """The tar of one .arrow member per batch (and `others`, name -> bytes), and its manifest entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (others or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for i, batch in enumerate(batches):
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            info = tarfile.TarInfo(f"{i:03d}.arrow")
            info.size = len(sink.getvalue())
            tf.addfile(info, io.BytesIO(sink.getvalue()))
    data = buf.getvalue()
    path.write_bytes(data)
    return {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": sum(b.num_rows for b in batches)}


def test_an_intact_tar_gives_its_batches_and_skips_other_members(tmp_path):
    batches = [arrow(["a", "b"], np.ones((2, 3))), arrow(["c"], np.zeros((1, 3)))]
    entry = write_tar(tmp_path / "s.tar", batches, {"notes.txt": b"not arrow", "x.arrow.txt": b"nor this"})
    members, problems = check_tar(tmp_path, entry, schema_fields(batches[0].schema))
    assert problems == [] and [m for m, _ in members] == ["000.arrow", "001.arrow"]
    assert [b.column("key").to_pylist() for _, b in members] == [["a", "b"], ["c"]]


def test_each_damage_is_named(tmp_path):
    batch = arrow(["a", "b"], np.ones((2, 3)))
    fields = schema_fields(batch.schema)
    entry = write_tar(tmp_path / "s.tar", [batch])
    assert check_tar(tmp_path, {**entry, "name": "gone.tar"}, fields) == ([], ["gone.tar: missing"])
    (tmp_path / "dir.tar").mkdir()
    members, problems = check_tar(tmp_path, {**entry, "name": "dir.tar"}, fields)
    assert members == [] and problems[0].startswith("dir.tar: unreadable (IsADirectoryError")
    assert check_tar(tmp_path, {**entry, "rows": 3}, fields)[1] == ["s.tar: 2 rows, manifest says 3"]
    assert check_tar(tmp_path, {**entry, "rows": 1}, fields)[1] == ["s.tar: 2 rows, manifest says 1"]
    other = {**fields, "feat.t": "fixed_size_list<item: float>[3]"}
    assert check_tar(tmp_path, entry, other)[1] == [  # both sides of what differs
        "s.tar: schema differs from the manifest: [('feat.t', 'fixed_size_list<item: float>[3]'), "
        "('feat.t', 'fixed_size_list<item: halffloat>[3]')]"]
    data = (tmp_path / "s.tar").read_bytes()
    flipped = [data[:i] + bytes([data[i] ^ 1]) + data[i + 1:] for i in range(len(data) - 8, len(data))]  # in the padding
    digests = [hashlib.sha256(d).hexdigest() for d in flipped]
    # a flipped byte whose digest sorts before the manifest's and one whose digest sorts after it
    for d, digest in (min(zip(flipped, digests), key=lambda x: x[1]), max(zip(flipped, digests), key=lambda x: x[1])):
        (tmp_path / "s.tar").write_bytes(d)
        assert check_tar(tmp_path, entry, fields) == ([], [f"s.tar: sha256 {digest[:16]}... differs from the manifest's "
                                                          f"{entry['sha256'][:16]}..."])
    assert min(digests) < entry["sha256"] < max(digests)
    for damaged in (data[:100], data + bytes(512)):  # truncated, or grown by a zero block tar readers skip
        (tmp_path / "s.tar").write_bytes(damaged)
        problems = check_tar(tmp_path, entry, fields)[1]
        assert problems[0] == f"s.tar: {len(damaged)} bytes on disk, manifest says {entry['bytes']} (truncated or replaced)"
        assert len(problems) == 2  # and its sha256


def test_garbage_with_a_matching_entry_is_unreadable_not_a_crash(tmp_path):
    (tmp_path / "g.tar").write_bytes(b"x" * 1024)
    data = (tmp_path / "g.tar").read_bytes()
    entry = {"name": "g.tar", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": 0}
    members, problems = check_tar(tmp_path, entry, {})
    assert members == [] and problems[0].startswith("g.tar: unreadable (")


def test_non_finite_features_name_the_first_three_rows(tmp_path):
    feats = np.ones((6, 3))
    feats[1, 2], feats[3, 0], feats[4, 1], feats[5, 2] = np.nan, np.inf, -np.inf, np.nan
    batch = arrow(["a", "b", "c", "d", "e", "f"], feats)
    entry = write_tar(tmp_path / "s.tar", [batch])
    members, problems = check_tar(tmp_path, entry, schema_fields(batch.schema))
    assert problems == ["s.tar: 4 rows have non-finite feat.t values, e.g. ['b', 'd', 'e']"] and len(members) == 1


def test_a_null_feature_value_is_non_finite_not_a_crash(tmp_path):
    values = pa.array([1.0, 1.0, 1.0, 1.0, None, 1.0], pa.float16())
    batch = pa.RecordBatch.from_arrays([pa.array(["a", "b"]), pa.FixedSizeListArray.from_arrays(values, 3)],
                                       names=["key", "feat.t"])
    entry = write_tar(tmp_path / "s.tar", [batch])
    assert check_tar(tmp_path, entry, schema_fields(batch.schema))[1] == [
        "s.tar: 1 rows have non-finite feat.t values, e.g. ['b']"]


def test_offsets_out_of_order_in_a_crafted_file_are_unreadable(tmp_path):
    # a string column whose offsets go backwards: Arrow's cheap validation passes it, the full one does not
    offsets = pa.array([0, 5, 2], pa.int32()).buffers()[1]
    keys = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"hello")])
    batch = pa.RecordBatch.from_arrays([keys], names=["key"])
    entry = write_tar(tmp_path / "s.tar", [batch])
    members, problems = check_tar(tmp_path, entry, schema_fields(batch.schema))
    assert members == [] and problems[0].startswith("s.tar: unreadable (ArrowInvalid") and "offset" in problems[0]
