"""Train-time reader: feature-set shards -> micro-batches of token sequences and teacher targets.

Shards are dealt to ranks (shard i -> rank i % world; with fewer shards than ranks every rank
reads all shards and keeps every world-th row). Each rank shuffles its shard order and its rows
(a seeded shuffle buffer) per epoch and cycles its rows, and every rank runs the same number of
steps per epoch, computed from the manifests' row counts, so no rank waits for another at the end.
The stream is a pure function of (seed, epoch, rank), which is what makes resuming exact: a
resumed run rebuilds the epoch's stream and skips the micro-batches it already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.errors import ArraError
from pipeline.data.featureset import FeatureSet, feature_column, token_rows
from pipeline.lm.caption_prefix import PLACEHOLDER, right_aligned
from pipeline.lm.rope2d import token_positions
from pipeline.lm.vocab import VocabLayout

IGNORE = -100


@dataclass(frozen=True)
class ShardRef:
    featureset: FeatureSet
    index: int
    rows: int
    columns: tuple[str, ...]  # added columns to join (a teacher added after the first extraction, caption features)

    def batches(self) -> Iterator[pa.RecordBatch]:
        return self.featureset.shard_batches(self.index, list(self.columns))


class Conditioner:
    """Condition tokens for a batch of rows: class tokens, a text tokenizer's ids of the caption, or
    the placeholders of a caption-features prefix (the features themselves ride beside the tokens)."""

    def __init__(self, layout: VocabLayout, text_tokenizer=None, max_text_len: int = 64):
        self.layout, self.tokenizer, self.max_text_len = layout, text_tokenizer, max_text_len
        if layout.condition == "caption-features":
            self.null = [PLACEHOLDER] * layout.max_text_len
        elif layout.condition == "text":
            if text_tokenizer is None:
                raise ArraError("a text-conditioned layout needs a text tokenizer")
            self.null = [] if layout.drops_prompt else self.encode([""])[0]  # "from-boi": no prompt turn at all
        else:
            self.null = [layout.null_class]

    def encode(self, captions: list[str]) -> list[list[int]]:
        ids = self.tokenizer(captions, truncation=True, max_length=self.max_text_len)["input_ids"]
        return [list(x) + self.layout.prompt_end for x in ids]

    def __call__(self, labels: np.ndarray, captions: list[str], drop: np.ndarray) -> list[list[int]]:
        if self.layout.condition == "class":
            return [self.null if d else [int(y)] for y, d in zip(labels, drop)]
        if self.layout.condition == "caption-features":
            return [self.null] * len(labels)
        return [self.null if d else ids for ids, d in zip(self.encode(captions), drop)]


def make_sequences(layout: VocabLayout, conditions: list[list[int]], codes: np.ndarray, align_positions: str = "image"):
    """Lay out `condition prefix image <eoi>` per row, right-padded: the prefix is (<rep>) <boi>, or a
    model's own tokens around <boi>; the image is the codes' token ids row by row, each row closed by the
    layout's newline token where it has one, and <eoi> may be followed by the layout's own tokens (a final
    <sep>). Returns input_ids, attention_mask, labels and align_mask.
    Labels are every token after the prefix: codes, newlines (a model trained with them, as Lumina-mGPT
    is, keeps ending its rows; sampling puts them in anyway), <eoi> and what follows it. align_mask: the
    positions whose next token is an image code (`image`: never one that predicts a newline or <eoi>), only
    the <boi> position (`boi`), or only the <rep> token (`rep-token`)."""
    if align_positions == "rep-token" and not layout.rep:
        raise ArraError("--align-positions rep-token needs a layout with a <rep> token (this model has none)")
    b = len(codes)
    prefix = layout.image_prefix
    head = len(prefix)
    image = layout.code_ids[codes]                                   # codes as token ids, row-major
    if layout.newline is not None:
        h, w = layout.grid
        image = np.concatenate([image.reshape(b, h, w), np.full((b, h, 1), layout.newline)], axis=2).reshape(b, -1)
    suffix = np.asarray(layout.image_suffix, dtype=np.int64)
    tail = np.concatenate([np.broadcast_to(np.asarray(prefix, dtype=np.int64), (b, head)), image,
                           np.broadcast_to(suffix, (b, len(suffix)))], axis=1)  # prefix, image, <eoi> (<sep>)
    is_code = np.r_[np.zeros(head, bool), layout.image_slots, np.zeros(len(suffix), bool)]
    marks = {"image": np.r_[is_code[1:], False],                     # the slot before each code
             "boi": np.arange(len(is_code)) == prefix.index(layout.boi),
             "rep-token": np.arange(len(is_code)) == 0}[align_positions]
    lengths = np.array([len(c) for c in conditions])
    span = tail.shape[1]
    t = int(lengths.max()) + span
    ids = np.full((b, t), layout.pad, dtype=np.int64)
    labels = np.full((b, t), IGNORE, dtype=np.int64)
    align = np.zeros((b, t), dtype=bool)
    if (lengths == lengths[0]).all():  # class tokens, or captions of one length: whole-batch slices
        rows = [(slice(None), int(lengths[0]), np.asarray(conditions, dtype=np.int64).reshape(b, lengths[0]))]
    else:
        rows = [(i, int(c), cond) for i, (c, cond) in enumerate(zip(lengths, conditions))]
    for r, c, cond in rows:
        ids[r, :c] = cond
        ids[r, c:c + span] = tail[r]
        labels[r, c + head:c + span] = tail[r, head:]       # image, <eoi> and what follows it
        align[r, c:c + span] = marks
    attn = (np.arange(t)[None] < (lengths + span)[:, None]).astype(np.int64)
    return ids, attn, labels, align


class TrainStream:
    def __init__(self, sets: list[FeatureSet], teacher: str | None, layout: VocabLayout, micro_batch: int,
                 rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 8192,
                 cond_dropout: float = 0.1, conditioner: Conditioner | None = None,
                 align_positions: str = "image", exclude: frozenset[str] = frozenset(), captions: str | None = None):
        """captions: the caption-feature column a caption-features layout reads."""
        self.teacher, self.layout, self.micro_batch, self.captions = teacher, layout, micro_batch, captions
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer, self.cond_dropout = max(shuffle_buffer, micro_batch), cond_dropout
        self.conditioner = conditioner or Conditioner(layout)
        self.align_positions, self.exclude = align_positions, exclude
        self.shards = [ShardRef(fs, i, s["rows"], tuple(c for c in fs.column_names() if c in (teacher, captions)))
                       for fs in sets for i, s in enumerate(fs.manifest["shards"])]
        for ref in self.shards:  # every rank, before the model is built: present at their size; contents as read
            ref.featureset.check_files(ref.index, list(ref.columns))
        self.by_shard = len(self.shards) >= world
        self.starts = np.cumsum([0] + [s.rows for s in self.shards])  # each shard's first row in the sets' order
        self.excluded = self._excluded_rows() if exclude else np.zeros(0, dtype=np.int64)

    def _excluded_rows(self) -> np.ndarray:
        """Positions (in the sets' order) of the rows whose key is excluded, read once from every shard
        so that an epoch counts exactly the rows that are trained on."""
        keys = pa.array(sorted(self.exclude))
        found = [self.starts[i] + seen + np.flatnonzero(pc.is_in(b.column("key"), keys).to_numpy(zero_copy_only=False))
                 for i, ref in enumerate(self.shards)
                 for seen, b in _offsets(ref.featureset.shard_batches(ref.index, []))]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def rank_shards(self, rank: int) -> list[int]:
        """Indices of the shards rank `rank` reads."""
        ids = range(len(self.shards))
        return list(ids[rank::self.world] if self.by_shard else ids)

    def rows_of_rank(self, rank: int) -> int:
        """Rows rank `rank` trains on in one pass: its shards' (or its every world-th row), less the excluded."""
        if self.by_shard:
            mine = self.rank_shards(rank)
            total = sum(self.shards[i].rows for i in mine)
            owner = np.searchsorted(self.starts, self.excluded, side="right") - 1  # the shard of each excluded row
            return total - int(np.isin(owner, mine).sum())
        return len(range(rank, int(self.starts[-1]), self.world)) - int((self.excluded % self.world == rank).sum())

    def steps_per_epoch(self, accumulation: int) -> int:
        """Optimizer steps every rank can take per epoch (the smallest rank decides)."""
        return min(self.rows_of_rank(r) for r in range(self.world)) // (self.micro_batch * accumulation)

    def _rows(self, rng: np.random.Generator) -> Iterator[dict | None]:
        """This rank's rows as column chunks, shard order shuffled, one pass after another forever;
        None marks the end of each pass."""
        while True:
            shards = self.rank_shards(self.rank)
            order = rng.permutation(len(shards))
            for n, j in enumerate(order):
                ref = self.shards[shards[j]]
                if n + 1 < len(order):  # a set at a URL fetches the next shard while this one is read
                    after = self.shards[shards[order[n + 1]]]
                    after.featureset.prefetch(after.index, list(after.columns))
                for seen, batch in _offsets(ref.batches()):
                    if not self.by_shard:  # keep every world-th row of the sets' rows, whatever order they are read in
                        first = self.starts[shards[j]] + seen
                        batch = batch.filter(pa.array(np.arange(first, first + batch.num_rows) % self.world == self.rank))
                    if self.exclude:
                        batch = batch.filter(pc.invert(pc.is_in(batch.column("key"), pa.array(sorted(self.exclude)))))
                    if batch.num_rows:
                        yield self._columns(batch)
            yield None

    def _columns(self, batch: pa.RecordBatch) -> dict:
        n = batch.num_rows
        out = {"label": batch.column("label").to_numpy(),
               "codes": batch.column("codes").flatten().to_numpy().reshape(n, -1),
               "caption": batch.column("caption").to_pylist() if self.layout.condition == "text" else [None] * n}
        if self.teacher:
            out["feat"] = batch.column(feature_column(self.teacher)).flatten().to_numpy().reshape(n, -1)
        if self.captions:
            out["caption_features"] = token_rows(batch.column(self.captions))  # one (tokens x dim) array a row, as stored
        return out

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Infinite micro-batches for `epoch` on this rank (the trainer takes as many as it needs).
        Rows are shuffled in buffers of `shuffle_buffer` rows that never span two passes, so the
        epoch's micro-batches (at most one pass of rows) never repeat a row."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        chunks, held = [], 0
        for chunk in self._rows(rng):
            if chunk is not None:
                chunks.append(chunk)
                held += len(chunk["label"])
                if held < self.shuffle_buffer:
                    continue
            elif not held:
                continue
            buffer = {k: _cat([c[k] for c in chunks]) for k in chunks[0]}
            order = rng.permutation(held)
            whole = len(order) // self.micro_batch * self.micro_batch
            for i in range(0, whole, self.micro_batch):
                yield self._batch({k: _take(v, order[i:i + self.micro_batch]) for k, v in buffer.items()}, rng)
            chunks = [{k: _take(v, order[whole:]) for k, v in buffer.items()}]  # fewer than a micro-batch: into the next pass
            held = len(order) - whole

    def _batch(self, rows: dict, rng: np.random.Generator) -> dict:
        drop = rng.random(len(rows["label"])) < self.cond_dropout
        conditions = self.conditioner(rows["label"], rows["caption"], drop)
        ids, attn, labels, align = make_sequences(self.layout, conditions, rows["codes"], self.align_positions)
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
               "labels": torch.from_numpy(labels), "align_mask": torch.from_numpy(align)}
        if self.layout.rope == "2d":  # each row's first code at the same position, whatever its condition's length
            before_image = torch.tensor([len(c) + len(self.layout.image_prefix) for c in conditions])
            out["position_ids"] = token_positions(self.layout, out["attention_mask"], before_image)
        if "feat" in rows:
            out["teacher"] = torch.from_numpy(rows["feat"])  # float16 as stored; the loss casts on the device
        if "caption_features" in rows:  # a dropped caption is the unconditional embedding whole
            features = rows["caption_features"]
            out["caption"], out["caption_len"] = right_aligned([None if d else f for f, d in zip(features, drop)],
                                                               self.layout.max_text_len, features[0].shape[1])
        return out


def _offsets(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(rows before it in its shard, batch) for each record batch of a shard."""
    seen = 0
    for batch in batches:
        yield seen, batch
        seen += batch.num_rows


def _cat(parts: list):
    return [x for p in parts for x in p] if isinstance(parts[0], list) else np.concatenate(parts)


def _take(v, idx):
    return [v[i] for i in idx] if isinstance(v, list) else v[idx]
