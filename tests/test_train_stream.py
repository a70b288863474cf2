"""The training stream's epoch: no row twice in an epoch whatever the shuffle buffer, and rows left
out with --exclude-keys are not counted in the epoch's steps (rows numbered as in test_rank_split)."""

from __future__ import annotations

import pytest

from pipeline.data.train_data import TrainStream
from test_rank_split import LAYOUT, SHARD_ROWS, TEACHER, row_set, rows_in


def stream(fs, rank=0, world=1, micro_batch=3, exclude=frozenset(), **kw) -> TrainStream:
    return TrainStream([fs], TEACHER, LAYOUT, micro_batch=micro_batch, rank=rank, world=world, seed=2,
                       cond_dropout=0.0, exclude=frozenset(exclude), **kw)


@pytest.mark.parametrize("buffer", [4, 35, 8192])
def test_an_epoch_never_repeats_a_row_even_when_the_buffer_outgrows_the_rows(tmp_path, buffer):
    s = stream(row_set(tmp_path), shuffle_buffer=buffer)     # 35 rows: 11 steps of 3 per epoch
    assert s.steps_per_epoch(1) == 11
    for epoch in (0, 1):
        batches = s.epoch(epoch)
        rows = [r for _ in range(11) for r in rows_in(next(batches))]
        assert len(rows) == len(set(rows)) == 33, f"buffer {buffer}: a row came twice in epoch {epoch}"


EXCLUDED = {0, 9, 17, 20, 33}  # rows of shards 0, 1, 2, 2, 4


@pytest.mark.parametrize("shard_rows, world", [(SHARD_ROWS, 1), (SHARD_ROWS, 2), ([8, 3], 3)])
def test_excluded_rows_are_neither_read_nor_counted(tmp_path, shard_rows, world):
    fs = row_set(tmp_path, shard_rows)
    total = sum(shard_rows)
    excluded = {r for r in EXCLUDED if r < total}
    for rank in range(world):
        full, part = stream(fs, rank, world, micro_batch=1, shuffle_buffer=1), \
            stream(fs, rank, world, micro_batch=1, shuffle_buffer=1, exclude={f"row{r}" for r in excluded})
        batches = full.epoch(0)
        mine = {r for _ in range(full.rows_of_rank(rank)) for r in rows_in(next(batches))}
        assert part.rows_of_rank(rank) == len(mine - excluded)
        batches = part.epoch(0)
        seen = [r for _ in range(part.rows_of_rank(rank)) for r in rows_in(next(batches))]
        assert sorted(seen) == sorted(mine - excluded)     # one pass: exactly the kept rows of this rank
    assert stream(fs, exclude={"row0", "not-a-key"}).rows_of_rank(0) == total - 1
