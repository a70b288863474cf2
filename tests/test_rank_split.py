"""Who does which part of the work: training's reader deals shards (or rows) to ranks, extraction
gives shard s to rank s % world. Checked rank by rank, in-process: the ranks' parts are disjoint
and cover the set, each rank sees exactly its rows, and every rank runs the same number of steps
even when the shards are uneven. (Comparing a 2-rank result with a 1-rank one cannot see a rank
that did every other rank's work too.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_image
from pipeline.data.featureset import FeatureSet, make_batch, make_schema, write_shard
from pipeline.data.train_data import TrainStream
from pipeline.lm.vocab import VocabLayout

LAYOUT = VocabLayout("class", condition_vocab=4, codebook_size=8, grid=(2, 2), tokenizer={})
SHARD_ROWS = [8, 8, 8, 8, 3]                      # uneven: the last shard is short
TEACHER = "t"


def row_set(path, shard_rows=SHARD_ROWS) -> FeatureSet:
    """A feature set written by hand in which row r (numbered across shards) has codes
    (r % 8, r // 8, 0, 0) and teacher feature (r, -r): every batch row names its row."""
    schema = make_schema(4, 8, (2, 2), {TEACHER: 2})
    shards, r = [], 0
    (path / "shards").mkdir(parents=True)
    for s, n in enumerate(shard_rows):
        batches = []
        for start in range(0, n, 3):                 # members of up to 3 rows
            ids = np.arange(r + start, r + min(start + 3, n))
            codes = np.stack([ids % 8, ids // 8, 0 * ids, 0 * ids], axis=1).astype(np.uint16)
            batches.append(make_batch(schema, [f"row{i}" for i in ids], [""] * len(ids), ids % 3, codes,
                                      {TEACHER: np.stack([ids, -ids], axis=1).astype(np.float16)}))
        shards.append(write_shard(path / "shards" / f"shard-{s:06d}.tar", batches))
        r += n
    manifest = {"rows": r, "shards": shards, "teachers": {TEACHER: {"dim": 2}},
                "tokenizer": {"code_len": 4, "codebook_size": 8, "grid": [2, 2]}}
    return FeatureSet(path, manifest)


def rows_in(batch: dict) -> list[int]:
    """The row numbers of a micro-batch, after checking that codes and teacher feature agree."""
    ids = batch["teacher"][:, 0].float().long()
    assert torch.equal(batch["teacher"][:, 1].float().long(), -ids)
    codes = batch["input_ids"][:, 2:6] - LAYOUT.image_offset             # <class> <boi> c1..c4 <eoi>
    assert torch.equal(codes[:, 0], ids % 8) and torch.equal(codes[:, 1], ids // 8), "teacher paired with another row"
    assert torch.equal(batch["input_ids"][:, 0], ids % 3)                 # its own label (no dropout)
    return ids.tolist()


def one_pass(fs: FeatureSet, rank: int, world: int) -> list[int]:
    """The rows rank `rank` reads in one pass over its part (micro-batch 1, no shuffle buffer)."""
    stream = TrainStream([fs], TEACHER, LAYOUT, micro_batch=1, rank=rank, world=world, seed=5, shuffle_buffer=1,
                         cond_dropout=0.0)
    batches = stream.epoch(0)
    return [r for _ in range(stream.rows_of_rank(rank)) for r in rows_in(next(batches))]


def shard_of(row: int, shard_rows=SHARD_ROWS) -> int:
    return int(np.searchsorted(np.cumsum(shard_rows), row, side="right"))


@pytest.mark.parametrize("world", [2, 3])
def test_training_ranks_read_disjoint_shards_that_cover_the_set(tmp_path, world):
    fs = row_set(tmp_path)
    seen = [one_pass(fs, rank, world) for rank in range(world)]
    for rank, rows in enumerate(seen):
        assert len(rows) == len(set(rows)), f"rank {rank} read a row twice in one pass"
        assert {shard_of(r) for r in rows} == set(range(rank, len(SHARD_ROWS), world))  # shard s -> rank s % world
        assert len(rows) == sum(SHARD_ROWS[rank::world])                               # every row of those shards
    assert sorted(r for rows in seen for r in rows) == list(range(sum(SHARD_ROWS)))    # disjoint, and cover


def test_with_fewer_shards_than_ranks_each_rank_keeps_its_own_rows(tmp_path):
    fs = row_set(tmp_path, [8, 3])
    seen = [one_pass(fs, rank, 3) for rank in range(3)]
    assert [len(rows) for rows in seen] == [4, 4, 3]
    for rank, rows in enumerate(seen):  # rank r keeps rows r, r + 3, ... whatever order it reads the shards in
        assert sorted(rows) == list(range(rank, 11, 3))


def test_every_rank_runs_the_same_steps_however_uneven_the_shards(tmp_path):
    fs = row_set(tmp_path)                                   # world 2: rank 0 has 8+8+3 = 19 rows, rank 1 has 16
    streams = [TrainStream([fs], TEACHER, LAYOUT, micro_batch=3, rank=r, world=2, seed=1, shuffle_buffer=3,
                           cond_dropout=0.0) for r in range(2)]
    assert [s.rows_of_rank(r) for r, s in enumerate(streams)] == [19, 16]
    assert [s.steps_per_epoch(accumulation=1) for s in streams] == [5, 5]   # 16 // 3: the smaller rank decides (19 // 3 = 6)
    assert [s.steps_per_epoch(accumulation=2) for s in streams] == [2, 2]   # 16 // 6 (19 // 6 = 3)
    for rank, stream in enumerate(streams):  # the steps of an epoch: full micro-batches of the rank's own, unrepeated rows
        batches = stream.epoch(3)
        rows = [r for _ in range(5) for r in rows_in(next(batches))]
        assert len(rows) == 15 == len(set(rows)) and {shard_of(r) for r in rows} <= set(range(rank, 5, 2))


def test_extraction_rank_writes_only_the_shards_it_owns(codebook, tmp_path, monkeypatch):
    """Each rank runs extraction in this process (RANK/WORLD_SIZE set, no process group, so the
    barriers do nothing): rank 0 of 2 writes shards 0, 2, 4 and cannot finish,
    rank 1 writes 1 and 3, rank 0 re-run writes the manifest, and the set equals the one-rank set."""
    import torch.distributed

    from conftest import TEACHER_RES
    from pipeline.data.jobs import JobError
    from stages.extract import extract
    from stages.options import ExtractOptions
    for i in range(18):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i:02d}.png", seed=i)

    def run(out, rank, world):
        for k, v in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
            monkeypatch.setenv(k, str(v))
        return extract(ExtractOptions(source=str(tmp_path / "src"), out=str(out), tokenizer_path=codebook,
                                      teacher_resolution=TEACHER_RES, batch_size=4, workers=0, shard_size=4,
                                      progress=False), log=lambda m: None)

    groups = []  # no process group: joining one is recorded, and the barriers see none (even when an earlier test made one)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: groups.append(a))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    two = tmp_path / "two"
    on_disk = lambda: sorted(int(p.stem[-6:]) for p in (two / "shards").glob("*.tar"))  # noqa: E731
    # 18 records in shards of 4 (4, 4, 4, 4, 2). Rank 0 alone: its shards, then no manifest
    with pytest.raises(JobError, match="shard 1 was not finished by its rank"):
        run(two, 0, 2)
    assert groups == [("gloo",)]
    assert on_disk() == [0, 2, 4]
    second = run(two, 1, 2)
    assert on_disk() == [0, 1, 2, 3, 4] and second.rows_extracted == 8 and not (two / "manifest.json").exists()
    first = run(two, 0, 2)                                    # rank 0 again: nothing left to extract, writes the manifest
    assert (first.rows_extracted, first.rows) == (0, 18)
    alone = run(tmp_path / "one", 0, 1)
    assert alone.rows_extracted == 18
    assert FeatureSet.open(two).manifest["shards"] == FeatureSet.open(tmp_path / "one").manifest["shards"]
