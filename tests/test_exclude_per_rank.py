"""--exclude-keys and the rank split: each rank's row count (which sets the steps per epoch) drops by
exactly the excluded rows in its part, whether ranks get whole shards or every world-th row, and a
pass reads exactly the rest. Counted by hand on a 35-row set (shards of 8, 8, 8, 8, 3)."""

from __future__ import annotations

import pytest
from test_rank_split import LAYOUT, TEACHER, row_set, rows_in

from pipeline.data.train_data import TrainStream

EXCLUDED = frozenset({"row0", "row9", "row33", "row34"})


@pytest.mark.parametrize("world,counts", [
    (2, [19 - 3, 16 - 1]),           # whole shards: rank 0 has shards 0, 2, 4 (row0, row33, row34), rank 1 shards 1, 3 (row9)
    (7, [4, 5, 4, 5, 5, 4, 4]),      # 5 shards < 7 ranks: rank r has rows r, r + 7, ... (5 each) less its excluded
])
def test_each_rank_counts_and_reads_its_rows_less_the_excluded(tmp_path, world, counts):
    fs = row_set(tmp_path)
    streams = [TrainStream([fs], TEACHER, LAYOUT, micro_batch=1, rank=r, world=world, seed=5, shuffle_buffer=1,
                           cond_dropout=0.0, exclude=EXCLUDED) for r in range(world)]
    assert [s.rows_of_rank(r) for r, s in enumerate(streams)] == counts
    seen = []
    for r, s in enumerate(streams):
        batches = s.epoch(0)
        seen += [row for _ in range(counts[r]) for row in rows_in(next(batches))]
    assert sorted(seen) == [r for r in range(35) if f"row{r}" not in EXCLUDED]
