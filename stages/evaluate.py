"""`arra-pipe eval`: generated images against a reference feature set.

- FID with the TF-Inception network, its input resized as TF 1.x did (the legacy bilinear resize
  clean-fid and NVIDIA's network emulate), and KID (unbiased polynomial-kernel MMD^2) beside it.
  The reference side is the set's own images (its source, at the recorded canonical crop;
  tokenizer reconstructions when the source is gone, and the report says so), class-balanced
  when the set is labelled; their Inception features are cached in `<set>/stats/`.
- Beside FID, KID and every FD: the real-vs-real floor, held-out real images at the generated n
  scored against the same reference, so a reader sees how much of a figure is small-n bias.
- FD in each teacher's feature space: the reference side is the set's cached features, never
  recomputed; generated images go through the same teacher, weights (sha256 checked) and view.
- CLIP-Score, when the samples have prompts: the mean cosine between each image's and its
  prompt's embeddings in a CLIP-family teacher (BiomedCLIP, CLIP), as the paper reports it
  (a raw cosine, not x100). By default the reference set's CLIP-family teacher is used.
- k-NN precision/recall (exact search with torch) in both spaces.
- Class accuracy of generated images under a linear probe fitted on a training set's cached
  teacher features: a proxy for conditioning fidelity, labelled as such.
Every figure carries the number of images and the seeds. Teachers, Inception, the tokenizer (when
it decodes the reference) and the k-NN search run on `device`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ArraError
from pipeline.data.featureset import IMAGE, FeatureSet, feature_column, shards_digest
from pipeline.data.files import atomic_write_bytes, sha256_file
from pipeline.data.images import center_crop, to_array
from pipeline.metrics.distribution import fd, fit_linear_probe, kid, precision_recall
from pipeline.data.set_images import column_array, reference_images

FID_MIN_IMAGES = 10_000


def load_generated(folder: Path, resolution: int) -> tuple[np.ndarray, list[dict]]:
    """The generated images (see `read_samples`) as uint8 at the reference resolution, with their rows."""
    from pipeline.data.samples import read_samples
    files, rows = read_samples(folder)
    if not files:
        raise ArraError(f"{folder}: no generated images (samples.jsonl or *.png)")
    return np.stack([to_array(center_crop(Image.open(f).convert("RGB"), resolution)) for f in files]), rows


def reference_key(fs: FeatureSet, inception) -> str:
    """What a set's reference Inception features depend on: its rows (the shards' digest), the
    source files and crop they came from, the network file and the resize to its input. A
    re-extracted set, another network or another resize never meets an old cache."""
    m = fs.manifest
    identity = [shards_digest(m["shards"]), [m["source"].get(k) for k in ("fingerprint", "files_fingerprint")],
                m["preprocess"], getattr(inception, "resize", "tf-legacy")]
    return f"{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}-{sha256_file(inception.path)[:12]}"


def reference_inception(fs: FeatureSet, inception, tokenizer_path: str | None, limit: int | None = None,
                        table=None) -> tuple[np.ndarray, str]:
    """Inception features of the first `limit` reference images (see `set_inception`)."""
    return set_inception(fs, inception, tokenizer_path, np.arange(min(limit or fs.rows, fs.rows)), table)


def set_inception(fs: FeatureSet, inception, tokenizer_path: str | None, rows: np.ndarray,
                  table=None) -> tuple[np.ndarray, str]:
    """Inception features of a set's images at `rows` (indices into its table, in that order),
    cached in `<set>/stats/` by `reference_key` and the rows, as float32: a cached FID equals the
    fresh one."""
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    tag = str(n) if np.array_equal(rows, np.arange(n)) else f"rows{hashlib.sha256(rows.tobytes()).hexdigest()[:12]}-{n}"
    cache = fs.stats_dir() / f"inception-{reference_key(fs, inception)}-{tag}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["features"], str(z["origin"])
    table = table if table is not None else fs.table([c for c in fs.columns if c != IMAGE])
    images, origin = reference_images(fs, tokenizer_path, None, table=table.take(rows), device=inception.device)
    feats = inception.features(images)
    cache.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, features=feats, origin=np.array(origin))
    atomic_write_bytes(cache, buf.getvalue())
    return feats, origin


def class_balanced_order(labels) -> tuple[np.ndarray, int | None]:
    """The order a reference set is read in. A labelled set (every label >= 0) is read class by
    class in turn (each class's first row, then each class's second row, ...) up to the smallest
    class's count, so every prefix of the order holds every class equally, to one row: a
    reference of the first N rows is class-balanced like the generated set, and the rows after it
    are a balanced held-out set. An unlabelled set keeps its own order. Returns the order and the
    number of classes (None when unlabelled)."""
    labels = np.asarray(labels)
    if len(labels) == 0 or (labels < 0).any():
        return np.arange(len(labels)), None
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    k = min(len(rows) for rows in per_class)
    return np.stack([rows[:k] for rows in per_class], axis=1).ravel(), len(per_class)


def _describe_order(order: np.ndarray, classes: int | None) -> str:
    return f"class-balanced, {len(order) // classes} per class x {classes}" if classes else "unlabelled, in set order"


def real_vs_real(metric, reference: np.ndarray, n: int, spare: np.ndarray | None, spare_from: str,
                 other: np.ndarray | None, other_from: str) -> dict:
    """The real-vs-real floor of `metric` at the generated set's n: n real images that are not in
    the reference, scored against it as generated images are. They are the reference set's rows
    after those the reference uses (`spare`), else rows of another real set (`other`, the training
    set), else the reference's own last n rows against the rest (a smaller reference, recorded).
    A generator that drew real images would score about this; a figure near it is at the floor."""
    if spare is not None and len(spare) >= n:
        held, against, origin = spare[:n], reference, spare_from
    elif other is not None and len(other) >= n:
        held, against, origin = other[:n], reference, other_from
    elif len(reference) - n >= 2:
        held, against, origin = reference[-n:], reference[:-n], "the reference's last rows against the others"
    else:
        return {"floor": None, "floor_note": f"no real-vs-real floor: fewer than {n} real images outside the reference"}
    return {"floor": metric(held, against), "floor_n": [n, len(against)], "floor_space": f"{n} real images ({origin}) "
            f"against {len(against)} reference rows"}


def teacher_features(fs: FeatureSet, name: str, images: np.ndarray, weights: str | None, device: str, batch_size: int) -> np.ndarray:
    """Generated images through the set's teacher, with the same weights and view."""
    from pipeline.models.teachers import load_recorded_teacher
    return load_recorded_teacher(fs.teachers[name], weights, str(fs.path)).to(device).embed(images, batch_size)


def default_clip_model(fs: FeatureSet) -> str | None:
    """The reference set's first CLIP-family teacher (one with a text tower), if any."""
    from pipeline.models.registry import loaders
    return next((name for name, desc in fs.teachers.items()
                 if getattr(loaders("teachers").get(desc["loader"]), "has_text_tower", False)), None)


def clip_scores(name: str, weights: str | None, images: np.ndarray, prompts: list[str], device: str,
                batch_size: int) -> np.ndarray:
    """Per-image cosine between the image embedding (the teacher's `cls` feature at its own input
    size) and the prompt's text embedding."""
    from pipeline.models.registry import build
    teacher = build("teachers", name, weights, aggregation="cls").to(device).eval()
    text = teacher.text_tower()
    image_emb = torch.from_numpy(teacher.embed(images, batch_size))
    text_emb = torch.cat([text(prompts[i:i + batch_size]).cpu() for i in range(0, len(prompts), batch_size)])
    return torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=1).numpy()


def evaluate(generated: str, reference: str, teachers: list[str] | None = None, teacher_path: str | None = None,
             inception_path: str | None = None, fid: bool = True, train_set: str | None = None,
             tokenizer_path: str | None = None, k: int = 3, device: str = "cpu", batch_size: int = 64,
             fid_reference: int | None = None, clip_model: str | None = None, clip_model_path: str | None = None) -> dict:
    fs = FeatureSet.open(reference)
    table = fs.table([c for c in fs.columns if c != IMAGE])  # read once; kept crops are not needed
    images, rows = load_generated(Path(generated), fs.manifest["preprocess"]["resolution"])
    seeds = [r["seed"] for r in rows if "seed" in r]
    n, n_ref = len(images), table.num_rows  # rows read, each shard's count checked against the manifest
    result = {"generated": {"path": str(generated), "images": n, "seeds": [min(seeds), max(seeds)] if seeds else None},
              "reference": {"path": str(fs.path), "rows": n_ref}, "metrics": []}

    def add(metric, value, space, **extra):
        result["metrics"].append({"metric": metric, "value": value, "space": space, "n_generated": n,
                                  "n_reference": n_ref, **extra})  # extra may narrow n_reference

    order, classes = class_balanced_order(np.asarray(table.column("label")))
    balance = _describe_order(order, classes)
    train = FeatureSet.open(train_set) if train_set else None
    train_table = train.table([c for c in train.columns if c != IMAGE]) if train else None
    train_order = class_balanced_order(np.asarray(train_table.column("label")))[0] if train else None
    held_out = f"held-out rows of {fs.path}, {balance.split(',')[0]}"
    train_from = f"rows of the training set {train.path}" if train else ""

    gen_by_teacher = {}
    for name in teachers or list(fs.teachers):
        gen = teacher_features(fs, name, images, teacher_path, device, batch_size)
        ref = column_array(table, feature_column(name))[order]
        other = (column_array(train_table, feature_column(name))[train_order]
                 if train and feature_column(name) in train_table.column_names else None)
        gen_by_teacher[name] = gen
        add(f"FD {name}", fd(gen, ref), f"{name} ({fs.teachers[name]['dim']}-d), reference features cached, {balance}",
            n_reference=len(ref), **real_vs_real(fd, ref, n, None, "", other, train_from))
        p, r = precision_recall(ref, gen, k, device)
        add(f"precision {name}", p, name, k=k, n_reference=len(ref))
        add(f"recall {name}", r, name, k=k, n_reference=len(ref))
    if fid:
        from pipeline.models.inception import Inception
        net = Inception(inception_path, device)
        n_fid = min(fid_reference or len(order), len(order))
        with_spare = len(order) >= n_fid + n  # the rows after the reference hold a held-out set of n
        feats, origin = set_inception(fs, net, tokenizer_path, order[:n_fid + n] if with_spare else order[:n_fid], table)
        ref_feats, spare = feats[:n_fid], feats[n_fid:] if with_spare else None
        other = None
        if not with_spare and train is not None and len(train_order) >= n:
            other = set_inception(train, net, tokenizer_path, train_order[:n], train_table)[0]
        gen_feats = net.features(images)
        note = f"FID on {n} < {FID_MIN_IMAGES} generated images is biased upward; compare only at equal n" if n < FID_MIN_IMAGES else ""
        space = f"TF-Inception pool3 ({net.resize} resize), reference = {origin}, {_describe_order(order[:n_fid], classes)}"
        add("FID", fd(gen_feats, ref_feats), space, note=note, n_reference=len(ref_feats),
            **real_vs_real(fd, ref_feats, n, spare, held_out, other, train_from))

        def kid_mean(a, b):
            return kid(a, b)[0]
        value, sd, subset = kid(gen_feats, ref_feats)
        add("KID", value, space, n_reference=len(ref_feats), sd=sd, subset_size=subset,
            note=f"unbiased MMD^2, polynomial kernel, mean (sd {sd:.2g}) over subsets of {subset}",
            **real_vs_real(kid_mean, ref_feats, n, spare, held_out, other, train_from))
        p, r = precision_recall(ref_feats, gen_feats, k, device)
        add("precision inception", p, space, k=k, n_reference=len(ref_feats))
        add("recall inception", r, space, k=k, n_reference=len(ref_feats))
    prompts = [r.get("prompt") for r in rows]
    if clip_model and not all(prompts):
        raise ArraError(f"--clip-model {clip_model}: {generated} has images without a prompt in samples.jsonl")
    clip_model = clip_model or (default_clip_model(fs) if all(prompts) else None)
    if clip_model:
        scores = clip_scores(clip_model, clip_model_path or teacher_path, images, prompts, device, batch_size)
        add(f"CLIP-Score {clip_model}", float(scores.mean()), f"{clip_model} image-prompt cosine (sd {scores.std():.4f})",
            n_reference=0)
    if train and rows and "class" in rows[0]:
        name = (teachers or list(fs.teachers))[0]
        probe = fit_linear_probe(column_array(train_table, feature_column(name)), np.asarray(train_table.column("label")))
        wanted = np.array([r["class"] for r in rows])
        add("class accuracy (proxy)", float((probe(gen_by_teacher[name]) == wanted).mean()),
            f"linear probe on {name} features of {train.path}")
        ref_labels = np.asarray(table.column("label"))
        add("class accuracy of real reference images (probe ceiling)", float((probe(column_array(table, feature_column(name))) == ref_labels).mean()),
            f"same probe on {fs.path}")
    return result
