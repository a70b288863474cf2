"""The training stream's epoch: no row twice in an epoch whatever the shuffle buffer, and rows left
out with --exclude-keys are not counted in the epoch's steps (rows numbered as in test_rank_split)."""

from __future__ import annotations

import numpy as np
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


def expected_order(shard_rows, buffer, micro_batch, seed, epoch, passes):
    """The micro-batches (row numbers) one rank of one world yields, computed independently of
    TrainStream from what its docstring promises: per pass the shards in a seeded random order, each
    read member by member (3 rows, as row_set writes them); rows gathered until at least `buffer` are
    held (or the pass ends), then shuffled and dealt in whole micro-batches, the remainder carried
    into the next pass. The generator draws, in order: the pass's shard permutation, each buffer's
    permutation, and one uniform per row of every micro-batch (the condition dropout)."""
    rng = np.random.default_rng([seed, epoch, 0])
    starts = np.cumsum([0] + list(shard_rows))
    out, held = [], []
    for _ in range(passes):
        reads = []
        for s in rng.permutation(len(shard_rows)):
            first, n = starts[s], shard_rows[s]
            reads += [list(range(first + a, first + min(a + 3, n))) for a in range(0, n, 3)]
        reads.append(None)                                   # the end of the pass
        for chunk in reads:
            if chunk is not None:
                held += chunk
                if len(held) < buffer:
                    continue
            elif not held:
                continue
            order = rng.permutation(len(held))
            whole = len(held) // micro_batch * micro_batch
            for i in range(0, whole, micro_batch):
                out.append([held[j] for j in order[i:i + micro_batch]])
                rng.random(micro_batch)
            held = [held[j] for j in order[whole:]]
    return out


@pytest.mark.parametrize("shard_rows, buffer, micro_batch", [
    (SHARD_ROWS, 6, 3),     # a buffer fills exactly at 6 rows (two members)
    (SHARD_ROWS, 6, 4),     # 6 held, 4 dealt, 2 carried: the next buffer fills at 8, past 6
    (SHARD_ROWS, 7, 2),     # fills at 9 (the first count of 7 or more)
    ([3, 3, 3, 3], 3, 3),   # one member fills a buffer: a pass ends with nothing held
])
def test_the_shuffle_buffer_deals_rows_in_the_seeded_order(tmp_path, shard_rows, buffer, micro_batch):
    fs = row_set(tmp_path, shard_rows)
    s = stream(fs, micro_batch=micro_batch, shuffle_buffer=buffer)
    want = expected_order(shard_rows, buffer, micro_batch, seed=2, epoch=1, passes=3)
    batches = s.epoch(1)
    got = [rows_in(next(batches)) for _ in want]              # three passes: across pass boundaries
    assert got == want


def test_the_stream_goes_on_after_a_pass_that_ends_with_nothing_held(tmp_path):
    s = stream(row_set(tmp_path), micro_batch=1, shuffle_buffer=1)   # every row dealt as read: nothing held at the end
    batches = s.epoch(0)
    passes = [[r for _ in range(35) for r in rows_in(next(batches))] for _ in range(3)]
    for rows in passes:
        assert sorted(rows) == list(range(35))                # each pass: every row once
    assert passes[0] != passes[1]                              # shard order drawn again per pass


@pytest.mark.parametrize("shard_rows", [[0], [0, 0, 0]])
def test_a_set_without_rows_has_no_rows_to_exclude_and_no_steps(tmp_path, shard_rows):
    """Shards with no rows (an extraction whose rows were all rejected): --exclude-keys finds no row,
    so every rank has 0 rows and 0 steps (not -1, nor an error)."""
    fs = row_set(tmp_path, shard_rows)
    for world in (1, 2, 4):
        for rank in range(world):
            s = stream(fs, rank, world, exclude={"row0"})
            assert s.excluded.tolist() == []
            assert s.rows_of_rank(rank) == 0
            assert s.steps_per_epoch(1) == 0
