"""How verify says a column tar does not line up with its shard (`keys_mismatch`, `_alignment`):
pinned on hand-made key columns, shorter, longer and out of order."""

from __future__ import annotations

import pyarrow as pa

from pipeline.data.featureset import _alignment, keys_mismatch


def keys(*names: str) -> pa.Array:
    return pa.array(names, pa.string())


def test_keys_mismatch_names_the_row_count_or_the_first_differing_row():
    assert keys_mismatch(keys("a", "b"), keys("a", "b")) is None
    assert keys_mismatch(keys("a", "b"), keys("a", "b", "c")) == "2 rows where the shard has 3"
    assert keys_mismatch(keys("a", "b", "c"), keys("a", "b")) == "3 rows where the shard has 2"
    # the first row that differs, not the first whose key sorts after the shard's
    assert keys_mismatch(keys("a", "a", "z"), keys("a", "b", "c")) == "row 1 has key 'a' where the shard has 'b'"


def test_alignment_checks_member_names_then_each_members_keys():
    def batch(*names):
        return pa.RecordBatch.from_arrays([keys(*names)], names=["key"])
    shard = [("000.arrow", keys("a", "b")), ("001.arrow", keys("c"))]
    assert _alignment("col.tar", [("000.arrow", batch("a", "b")), ("001.arrow", batch("c"))], shard) == []
    assert _alignment("col.tar", [("000.arrow", batch("a", "b"))], shard) == [
        "col.tar: members ['000.arrow']... do not match the shard's ['000.arrow', '001.arrow']..."]
    assert _alignment("col.tar", [("000.arrow", batch("a", "b")), ("001.arrow", batch("d"))], shard) == [
        "col.tar: member 001.arrow does not line up with the shard: row 0 has key 'd' where the shard has 'c'"]


def test_alignment_names_the_first_four_members_of_each_side():
    def batch(*names):
        return pa.RecordBatch.from_arrays([keys(*names)], names=["key"])
    shard = [(f"{i:03d}.arrow", keys("a")) for i in range(6)]
    column = [(f"{i:03d}.arrow", batch("a")) for i in range(1, 7)]  # one member name off, and sorting after the shard's
    assert _alignment("col.tar", column, shard) == [
        "col.tar: members ['001.arrow', '002.arrow', '003.arrow', '004.arrow']... do not match the shard's "
        "['000.arrow', '001.arrow', '002.arrow', '003.arrow']..."]
