"""`arra-pipe audit`: faiss checks on the cached teacher features of feature sets.

- dedup SET: near-duplicate pairs inside a set, and a keys file that `train --exclude-keys` takes;
- leakage TRAIN TEST: test rows with a training row above the threshold (medical sets hold many
  images per patient, so a random split leaks);
- memorization GENERATED SET: the nearest training row of each generated image, the histogram of
  those cosines and a grid of the closest pairs.

No teacher runs for feature sets; generated PNGs are embedded with the very teacher and
preprocessing recorded in the set's manifest (the extractor's own crop loader), else their cosines
would not be comparable; that teacher runs on `device`. The faiss searches run on the CPU
(faiss-cpu). Every report names the index and, when it is approximate, the recall measured
against exact search.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from pipeline.metrics import neighbours
from pipeline.errors import ArraError
from pipeline.data.featureset import MANIFEST, FeatureSet, feature_column
from pipeline.data.files import atomic_write_json
from stages.options import AuditOptions

class AuditError(ArraError):
    """The sets cannot be compared (other teacher, missing column) or the input is unusable."""


@dataclass
class Rows:
    """Keys and L2-normalised float32 features of one side of an audit."""

    keys: list[str]
    x: np.ndarray


# ---------------------------------------------------------------------------------------------
# reading features


def pick_teacher(fs: FeatureSet, teacher: str | None) -> str:
    names = sorted(fs.teachers)
    if teacher is None:
        if len(names) != 1:
            raise AuditError(f"{fs.path} has teachers {names}: choose one with --teacher")
        return names[0]
    if teacher not in names:
        raise AuditError(f"{fs.path} has no teacher {teacher!r}; it has {names}")
    return teacher


def load_rows(fs: FeatureSet, teacher: str) -> Rows:
    """Keys and features of `teacher`; reading checks every tar, non-finite features included."""
    keys, feats = [], []
    col = feature_column(teacher)
    for batch in fs.batches([teacher] if teacher in fs.columns else []):
        keys += batch.column("key").to_pylist()
        feats.append(batch.column(col).flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1))
    x = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, fs.teachers[teacher]["dim"]), np.float32)
    return Rows(keys, neighbours.normalise(x))


def check_same_space(a: FeatureSet, b: FeatureSet, teacher: str) -> None:
    """Cosines across two sets mean something only for one teacher, weights and view."""
    if teacher not in b.teachers:
        raise AuditError(f"{b.path} has no teacher {teacher!r}; it has {sorted(b.teachers)}")
    from pipeline.models.teachers import identity_diffs
    diffs = [f"teacher {d}" for d in identity_diffs(a.teachers[teacher], b.teachers[teacher], (f"in {a.path}", f"in {b.path}"))]
    pre_a, pre_b = a.manifest["preprocess"], b.manifest["preprocess"]
    diffs += [f"preprocess {k}: {pre_a.get(k)!r} vs {pre_b.get(k)!r}"
              for k in ("resolution", "teacher_view") if pre_a.get(k) != pre_b.get(k)]
    if diffs:
        raise AuditError(f"{a.path} and {b.path} are not in the same feature space: " + "; ".join(diffs))


def index_for(db: Rows, queries: Rows | None, opts: AuditOptions) -> neighbours.Neighbours:
    if len(db.keys) < (2 if queries is None else 1):
        raise AuditError(f"too few rows to audit: {len(db.keys)}")
    return neighbours.build(db.x, opts.index, None if queries is None else queries.x, opts.recall_target, seed=opts.seed)


# ---------------------------------------------------------------------------------------------
# reports


def write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_keys(path: Path, keys) -> None:
    """One key per line, as `train --exclude-keys` reads it."""
    path.write_text("".join(f"{k}\n" for k in keys), encoding="utf-8")


def key_warning(keys) -> list[str]:
    spaced = [k for k in keys if any(c.isspace() for c in k)]
    return [f"warning: {len(spaced)} keys contain whitespace (e.g. {spaced[0]!r}); `train --exclude-keys` "
            "splits its file on whitespace and will not match them"] if spaced else []


def finish(out: Path, report: dict, lines: list[str]) -> str:
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text, encoding="utf-8")
    atomic_write_json(out / "report.json", report)
    return text


def header(command: str, sets: dict[str, FeatureSet | Path], teacher: str, opts: AuditOptions,
           nb: neighbours.Neighbours) -> list[str]:
    where = ", ".join(f"{role} {getattr(s, 'path', s)}" for role, s in sets.items())
    return [f"audit {command}: {where}", f"teacher {teacher}, cosine threshold {opts.threshold}",
            f"index: {nb.describe()}"]


def truncated_note(sims: np.ndarray, threshold: float, k: int) -> list[str]:
    """Rows whose k-th neighbour is still above the threshold may have more matches than listed."""
    full = int((sims[:, -1] >= threshold).sum()) if sims.shape[1] else 0
    return [f"note: {full} rows have all {k} neighbours looked at above the threshold; "
            f"raise --k to list every match"] if full else []


# ---------------------------------------------------------------------------------------------
# dedup


def groups_of(pairs: list[tuple[int, int]], n: int) -> list[list[int]]:
    """Connected components (union-find) of the duplicate pairs, each sorted by row."""
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(b)] = root(a)
    members: dict[int, list[int]] = {}
    for i in sorted({i for p in pairs for i in p}):
        members.setdefault(root(i), []).append(i)
    return list(members.values())


def dedup(path: str, out: str, opts: AuditOptions = AuditOptions(), log=print) -> str:
    """Pairs of rows at or above the threshold; the keys file keeps the first row of each group
    (connected pairs) and lists the later ones."""
    fs = FeatureSet.open(path)
    teacher = pick_teacher(fs, opts.teacher)
    rows = load_rows(fs, teacher)
    log(f"dedup: {len(rows.keys)} rows of {teacher}; indexing")
    nb = index_for(rows, None, opts)
    sims, ids = nb.search(None, opts.k)
    q, j = np.nonzero((sims >= opts.threshold) & (ids >= 0))
    best: dict[tuple[int, int], float] = {}
    for a, b, s in zip(q.tolist(), ids[q, j].tolist(), sims[q, j].tolist()):
        pair = (min(a, b), max(a, b))
        best[pair] = max(best.get(pair, -1.0), s)
    pairs = sorted(best, key=lambda p: (-best[p], p))
    groups = groups_of(pairs, len(rows.keys))
    drop = sorted(i for g in groups for i in g[1:])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "pairs.csv", ["key_a", "key_b", "cosine"],
              ([rows.keys[a], rows.keys[b], f"{best[(a, b)]:.6f}"] for a, b in pairs))
    write_keys(out / "exclude-keys.txt", (rows.keys[i] for i in drop))
    report = {"command": "dedup", "set": str(fs.path), "teacher": teacher, "threshold": opts.threshold,
              "k": opts.k, "rows": len(rows.keys), "pairs": len(pairs), "groups": len(groups),
              "excluded": len(drop), "index": nb.to_dict(),
              "files": {"pairs": "pairs.csv", "exclude_keys": "exclude-keys.txt"}}
    lines = header("dedup", {"set": fs}, teacher, opts, nb) + [
        f"{len(pairs)} near-duplicate pairs in {len(groups)} groups among {len(rows.keys)} rows; "
        f"{len(drop)} later rows listed in {out / 'exclude-keys.txt'} (for train --exclude-keys)"]
    lines += [f"  {best[p]:.4f}  {rows.keys[p[0]]}  ~  {rows.keys[p[1]]}" for p in pairs[:10]]
    lines += truncated_note(sims, opts.threshold, opts.k) + key_warning(rows.keys[i] for i in drop)
    return finish(out, report, lines)


# ---------------------------------------------------------------------------------------------
# leakage


def leakage(train_path: str, test_path: str, out: str, opts: AuditOptions = AuditOptions(), log=print) -> str:
    """Test rows whose nearest training rows are at or above the threshold. Writes the leaked test
    keys and, for `train --exclude-keys`, every training row that matched a test row."""
    train_fs, test_fs = FeatureSet.open(train_path), FeatureSet.open(test_path)
    teacher = pick_teacher(train_fs, opts.teacher)
    check_same_space(train_fs, test_fs, teacher)
    train, test = load_rows(train_fs, teacher), load_rows(test_fs, teacher)
    log(f"leakage: {len(test.keys)} test rows against {len(train.keys)} training rows of {teacher}; indexing")
    nb = index_for(train, test, opts)
    sims, ids = nb.search(test.x, opts.k)
    q, j = np.nonzero((sims >= opts.threshold) & (ids >= 0))
    pairs = [(a, b, s) for a, b, s in zip(q.tolist(), ids[q, j].tolist(), sims[q, j].tolist())]
    leaked = sorted({a for a, _, _ in pairs})
    matched = sorted({b for _, b, _ in pairs})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "pairs.csv", ["test_key", "train_key", "cosine"],
              ([test.keys[a], train.keys[b], f"{s:.6f}"] for a, b, s in pairs))
    write_keys(out / "leaked-test-keys.txt", (test.keys[i] for i in leaked))
    write_keys(out / "exclude-train-keys.txt", (train.keys[i] for i in matched))
    report = {"command": "leakage", "train": str(train_fs.path), "test": str(test_fs.path), "teacher": teacher,
              "threshold": opts.threshold, "k": opts.k, "train_rows": len(train.keys), "test_rows": len(test.keys),
              "leaked_test_rows": len(leaked), "matched_train_rows": len(matched), "pairs": len(pairs),
              "index": nb.to_dict(), "files": {"pairs": "pairs.csv", "leaked_test_keys": "leaked-test-keys.txt",
                                               "exclude_train_keys": "exclude-train-keys.txt"}}
    share = len(leaked) / len(test.keys) if test.keys else 0.0
    lines = header("leakage", {"train": train_fs, "test": test_fs}, teacher, opts, nb) + [
        f"{len(leaked)} of {len(test.keys)} test rows ({share:.2%}) have a training row at or above the threshold "
        f"({len(pairs)} pairs, {len(matched)} training rows)",
        f"leaked test keys: {out / 'leaked-test-keys.txt'}; training keys to exclude (train --exclude-keys): "
        f"{out / 'exclude-train-keys.txt'}"]
    top = sorted(pairs, key=lambda p: -p[2])[:10]
    lines += [f"  {s:.4f}  test {test.keys[a]}  ~  train {train.keys[b]}" for a, b, s in top]
    lines += truncated_note(sims, opts.threshold, opts.k) + key_warning(train.keys[i] for i in matched)
    return finish(out, report, lines)


# ---------------------------------------------------------------------------------------------
# memorization


def embed_images(files: list[Path], root: Path, fs: FeatureSet, teacher: str, teacher_path: str | None,
                 device: str = "cpu", batch_size: int = 32) -> tuple[Rows, list[dict]]:
    """Teacher features of image files: their canonical crop as the set was made (the extractor's
    crop loader), then `Teacher.embed`, as eval embeds generated images."""
    from pipeline.data.crops import crop_loader
    from pipeline.data.sources import Record
    from pipeline.models.teachers import load_recorded_teacher
    pre = fs.manifest["preprocess"]
    model = load_recorded_teacher(fs.teachers[teacher], teacher_path, str(fs.path)).to(device)
    records = [Record(f.relative_to(root).as_posix(), "", -1, ("file", str(f)), f.name) for f in files]
    batches = [list(range(i, min(i + batch_size, len(files)))) for i in range(0, len(files), batch_size)]
    loader = crop_loader(records, batches, pre["resolution"], [], "crop", pre["max_pixels"], 0)
    keys, feats, rejects = [], [], []
    for ok, crops, _, bad in loader:
        rejects += [{"key": records[i].key, "reason": reason} for i, reason in bad]
        if ok:
            keys += [records[i].key for i in ok]
            feats.append(model.embed(crops.numpy(), batch_size))
    if not keys:
        raise AuditError(f"no usable generated image among {len(files)} files: {rejects[:3]}")
    return Rows(keys, neighbours.normalise(np.concatenate(feats))), rejects


def decode_rows(fs: FeatureSet, keys: list[str], tokenizer_path: str | None) -> tuple[dict[str, np.ndarray], str | None]:
    """Images of the rows `keys`, decoded from their codes with the set's tokenizer; ({}, why)
    when the tokenizer weights are not at hand."""
    import torch
    from pipeline.models.image_tokenizers import load_recorded_tokenizer
    try:
        model = load_recorded_tokenizer(fs.manifest["tokenizer"], tokenizer_path)
    except ValueError as exc:
        return {}, f"training images not shown ({fs.path}): {exc}"
    wanted = pa.array(sorted(set(keys)), pa.string())
    images = {}
    for batch in fs.batches([]):  # keys and codes are in the shards
        batch = batch.filter(pc.is_in(batch.column("key"), value_set=wanted))
        if batch.num_rows:
            codes = batch.column("codes").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            pixels = model.decode(torch.from_numpy(codes).view(batch.num_rows, *model.grid)).cpu().numpy()
            images.update(zip(batch.column("key").to_pylist(), pixels))
    return images, None


def histogram(cos: np.ndarray, width: float = 0.05) -> list[tuple[float, float, int]]:
    """(low, high, count) bins of `width` from below the smallest cosine up to 1."""
    top = round(1 / width)
    low = min(math.floor(float(cos.min()) / width), top - 1)
    edges = np.arange(low, top + 1) * width
    counts, _ = np.histogram(np.clip(cos, edges[0], 1.0), bins=edges)
    return [(round(float(a), 4), round(float(b), 4), int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts)]


def histogram_text(bins, threshold: float) -> list[str]:
    most = max(c for _, _, c in bins) or 1
    return [f"  [{a:5.2f}, {b:5.2f}{']' if b >= 1 else ')'} {c:7d}  {'#' * math.ceil(40 * c / most) if c else ''}"
            f"{'  <- threshold' if a <= threshold < b else ''}" for a, b, c in bins]


def histogram_png(bins, threshold: float, path: Path, width: int = 560, height: int = 260) -> None:
    """Bar chart of the nearest-neighbour cosines with PIL alone; the threshold is a red line."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 12, 24, height - 30
    lo, hi = bins[0][0], bins[-1][1]
    x = lambda v: left + (v - lo) / (hi - lo) * (right - left)  # noqa: E731
    most = max(c for _, _, c in bins) or 1
    for a, b, c in bins:
        draw.rectangle([x(a) + 1, bottom - (bottom - top) * c / most, x(b) - 1, bottom], fill=(70, 110, 180))
    draw.line([left, bottom, right, bottom], fill="black")
    draw.line([left, top, left, bottom], fill="black")
    for a, _, _ in bins[::max(1, len(bins) // 8)] + [(hi, hi, 0)]:
        draw.text((x(a) - 12, bottom + 6), f"{a:.2f}", fill="black")
    draw.text((4, top - 4), str(most), fill="black")
    draw.text((4, bottom - 10), "0", fill="black")
    if lo <= threshold <= hi:
        draw.line([x(threshold), top, x(threshold), bottom], fill=(220, 30, 30), width=2)
    draw.text((left, 4), "cosine of each generated image to its nearest training row", fill="black")
    img.save(path)


def pair_grid(pairs: list[tuple[np.ndarray, np.ndarray | None, str]], path: Path, cell: int = 96, cols: int = 4) -> None:
    """Tiles of (generated | nearest training image) with their cosine; one image wide when the
    training image is not available."""
    wide = 2 if any(t is not None for _, t, _ in pairs) else 1
    tile_w, tile_h = wide * cell + 8, cell + 16
    cols = min(cols, len(pairs))
    grid = Image.new("RGB", (cols * tile_w, math.ceil(len(pairs) / cols) * tile_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (gen, train, caption) in enumerate(pairs):
        r, c = divmod(i, cols)
        x, y = c * tile_w, r * tile_h
        for j, img in enumerate((gen, train)[:wide]):
            if img is not None:
                grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x + j * cell, y))
        draw.text((x + 2, y + cell + 2), caption, fill="black")
    grid.save(path)


def memorization(generated: str, path: str, out: str, opts: AuditOptions = AuditOptions(),
                 tokenizer_path: str | None = None, teacher_path: str | None = None, show: int = 16,
                 device: str = "cpu", log=print) -> str:
    """Nearest training row of every generated image (a folder of PNGs or a feature set)."""
    fs = FeatureSet.open(path)
    teacher = pick_teacher(fs, opts.teacher)
    generated = Path(generated)
    train = load_rows(fs, teacher)
    rejects, gen_fs = [], None
    if (generated / MANIFEST).is_file():
        gen_fs = FeatureSet.open(generated)
        check_same_space(fs, gen_fs, teacher)
        gen = load_rows(gen_fs, teacher)
    else:
        from pipeline.data.samples import SAMPLES, read_samples
        files, _ = read_samples(generated)
        if not files:
            raise AuditError(f"{generated}: no {SAMPLES} and no PNG images")
        log(f"memorization: embedding {len(files)} generated images with {teacher}")
        gen, rejects = embed_images(files, generated, fs, teacher, teacher_path, device)
    log(f"memorization: {len(gen.keys)} generated against {len(train.keys)} training rows; indexing")
    nb = index_for(train, gen, opts)
    sims, ids = nb.search(gen.x, 1)
    cos, near = sims[:, 0], ids[:, 0]
    order = np.argsort(-cos, kind="stable")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "nearest.csv", ["generated_key", "train_key", "cosine"],
              ([gen.keys[i], train.keys[near[i]], f"{cos[i]:.6f}"] for i in order))
    bins = histogram(cos)
    histogram_png(bins, opts.threshold, out / "histogram.png")
    closest = order[:show].tolist()
    train_images, note = decode_rows(fs, [train.keys[near[i]] for i in closest], tokenizer_path)
    if gen_fs is not None:
        gen_images, gen_note = decode_rows(gen_fs, [gen.keys[i] for i in closest], None)
        note = note or gen_note
    else:
        from pipeline.data.images import to_rgb
        gen_images = {gen.keys[i]: np.asarray(to_rgb(Image.open(generated / gen.keys[i]))) for i in closest}
    blank = np.full((8, 8, 3), 255, np.uint8)
    pair_grid([(gen_images.get(gen.keys[i], blank), train_images.get(train.keys[near[i]]), f"{cos[i]:.3f}")
               for i in closest], out / "closest.png")
    above = int((cos >= opts.threshold).sum())
    report = {"command": "memorization", "generated": str(generated), "set": str(fs.path), "teacher": teacher,
              "threshold": opts.threshold, "generated_rows": len(gen.keys), "train_rows": len(train.keys),
              "rejected": rejects, "above_threshold": above,
              "cosine": {"max": float(cos.max()), "mean": float(cos.mean()), "median": float(np.median(cos))},
              "histogram": bins, "index": nb.to_dict(), "grid_note": note,
              "files": {"nearest": "nearest.csv", "histogram": "histogram.png", "grid": "closest.png"}}
    lines = header("memorization", {"generated": generated, "set": fs}, teacher, opts, nb) + [
        f"{above} of {len(gen.keys)} generated images have a training row at or above the threshold; "
        f"nearest cosine max {cos.max():.4f}, median {np.median(cos):.4f}"
        + (f"; {len(rejects)} generated files unreadable" if rejects else ""),
        "histogram of nearest-neighbour cosines:"] + histogram_text(bins, opts.threshold)
    lines += [f"  {cos[i]:.4f}  {gen.keys[i]}  ~  train {train.keys[near[i]]}" for i in closest[:10]]
    lines += [f"grid of the {len(closest)} closest pairs (generated | training): {out / 'closest.png'}",
              f"histogram: {out / 'histogram.png'}; every image: {out / 'nearest.csv'}"]
    lines += [note] if note else []
    return finish(out, report, lines)
