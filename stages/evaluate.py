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
- The independent judge (`pipeline.metrics.judge`), with a labelled training set: a small CNN
  trained on that set's own images (cached in its `stats/`), never on the teacher, so its class
  accuracy (with its ceiling on the real reference images) and its FD (with the real-vs-real floor)
  are not true by construction for the arm trained towards the teacher.
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


class _Sets:
    """The reference set read once (class-balanced order) and the optional training set beside it."""

    def __init__(self, reference: str, train_set: str | None):
        self.fs = FeatureSet.open(reference)
        self.table = self.fs.table([c for c in self.fs.columns if c != IMAGE])  # kept crops are not needed
        self.order, self.classes = class_balanced_order(np.asarray(self.table.column("label")))
        self.balance = _describe_order(self.order, self.classes)
        self.held_out = f"held-out rows of {self.fs.path}, {self.balance.split(',')[0]}"
        self.train = FeatureSet.open(train_set) if train_set else None
        self.train_table = self.train.table([c for c in self.train.columns if c != IMAGE]) if self.train else None
        self.train_order, train_classes = (class_balanced_order(np.asarray(self.train_table.column("label")))
                                           if self.train else (None, None))
        self.train_labelled = train_classes is not None
        self.train_from = f"rows of the training set {self.train.path}" if self.train else ""


class _Metrics(list):
    """The evaluation's metric rows, each with the number of generated and reference images."""

    def __init__(self, n: int, n_ref: int):
        super().__init__()
        self.n, self.n_ref = n, n_ref

    def add(self, metric, value, space, **extra):
        self.append({"metric": metric, "value": value, "space": space, "n_generated": self.n,
                     "n_reference": self.n_ref, **extra})  # extra may narrow n_reference


def evaluate(generated: str, reference: str, teachers: list[str] | None = None, teacher_path: str | None = None,
             inception_path: str | None = None, fid: bool = True, train_set: str | None = None,
             tokenizer_path: str | None = None, k: int = 3, device: str = "cpu", batch_size: int = 64,
             fid_reference: int | None = None, clip_model: str | None = None, clip_model_path: str | None = None,
             judge: bool = True) -> dict:
    sets = _Sets(reference, train_set)
    images, rows = load_generated(Path(generated), sets.fs.manifest["preprocess"]["resolution"])
    seeds = [r["seed"] for r in rows if "seed" in r]
    metrics = _Metrics(len(images), sets.table.num_rows)  # rows read, each shard's count checked against the manifest
    teachers = teachers or list(sets.fs.teachers)
    gen_by_teacher = {name: _teacher_metrics(metrics, sets, name, images, teacher_path, k, device, batch_size)
                      for name in teachers}
    if fid:
        _inception_metrics(metrics, sets, images, inception_path, tokenizer_path, fid_reference, k, device)
    prompts = [r.get("prompt") for r in rows]
    if clip_model and not all(prompts):
        raise ArraError(f"--clip-model {clip_model}: {generated} has images without a prompt in samples.jsonl")
    clip_model = clip_model or (default_clip_model(sets.fs) if all(prompts) else None)
    if clip_model:
        scores = clip_scores(clip_model, clip_model_path or teacher_path, images, prompts, device, batch_size)
        metrics.add(f"CLIP-Score {clip_model}", float(scores.mean()),
                    f"{clip_model} image-prompt cosine (sd {scores.std():.4f})", n_reference=0)
    if sets.train and rows and "class" in rows[0]:
        wanted = np.array([r["class"] for r in rows])
        _class_accuracy(metrics, sets, teachers[0], gen_by_teacher[teachers[0]], wanted)
        if judge and sets.train_labelled:
            _judge_metrics(metrics, sets, images, wanted, tokenizer_path, device)
    return {"generated": {"path": str(generated), "images": len(images), "seeds": [min(seeds), max(seeds)] if seeds else None},
            "reference": {"path": str(sets.fs.path), "rows": sets.table.num_rows}, "metrics": list(metrics)}


def _teacher_metrics(metrics: _Metrics, sets: _Sets, name: str, images: np.ndarray, weights: str | None, k: int,
                     device: str, batch_size: int) -> np.ndarray:
    """FD, precision and recall in teacher `name`'s space; returns the generated images' features."""
    gen = teacher_features(sets.fs, name, images, weights, device, batch_size)
    ref = column_array(sets.table, feature_column(name))[sets.order]
    other = (column_array(sets.train_table, feature_column(name))[sets.train_order]
             if sets.train and feature_column(name) in sets.train_table.column_names else None)
    metrics.add(f"FD {name}", fd(gen, ref), f"{name} ({sets.fs.teachers[name]['dim']}-d), reference features cached, "
                f"{sets.balance}", n_reference=len(ref), **real_vs_real(fd, ref, metrics.n, None, "", other, sets.train_from))
    p, r = precision_recall(ref, gen, k, device)
    metrics.add(f"precision {name}", p, name, k=k, n_reference=len(ref))
    metrics.add(f"recall {name}", r, name, k=k, n_reference=len(ref))
    return gen


def _inception_metrics(metrics: _Metrics, sets: _Sets, images: np.ndarray, inception_path: str | None,
                       tokenizer_path: str | None, fid_reference: int | None, k: int, device: str) -> None:
    """FID and KID, each with its real-vs-real floor, and precision/recall in Inception space."""
    from pipeline.models.inception import Inception
    net, n = Inception(inception_path, device), metrics.n
    n_fid = min(fid_reference or len(sets.order), len(sets.order))
    with_spare = len(sets.order) >= n_fid + n  # the rows after the reference hold a held-out set of n
    feats, origin = set_inception(sets.fs, net, tokenizer_path, sets.order[:n_fid + n] if with_spare else sets.order[:n_fid],
                                  sets.table)
    ref_feats, spare = feats[:n_fid], feats[n_fid:] if with_spare else None
    other = None
    if not with_spare and sets.train is not None and len(sets.train_order) >= n:
        other = set_inception(sets.train, net, tokenizer_path, sets.train_order[:n], sets.train_table)[0]
    gen_feats = net.features(images)
    note = f"FID on {n} < {FID_MIN_IMAGES} generated images is biased upward; compare only at equal n" if n < FID_MIN_IMAGES else ""
    space = (f"TF-Inception pool3 ({net.resize} resize), reference = {origin}, "
             f"{_describe_order(sets.order[:n_fid], sets.classes)}")
    floor = {"spare": spare, "spare_from": sets.held_out, "other": other, "other_from": sets.train_from}
    metrics.add("FID", fd(gen_feats, ref_feats), space, note=note, n_reference=len(ref_feats),
                **real_vs_real(fd, ref_feats, n, **floor))
    value, sd, subset = kid(gen_feats, ref_feats)
    metrics.add("KID", value, space, n_reference=len(ref_feats), sd=sd, subset_size=subset,
                note=f"unbiased MMD^2, polynomial kernel, mean (sd {sd:.2g}) over subsets of {subset}",
                **real_vs_real(lambda a, b: kid(a, b)[0], ref_feats, n, **floor))
    p, r = precision_recall(ref_feats, gen_feats, k, device)
    metrics.add("precision inception", p, space, k=k, n_reference=len(ref_feats))
    metrics.add("recall inception", r, space, k=k, n_reference=len(ref_feats))


def _class_accuracy(metrics: _Metrics, sets: _Sets, name: str, gen: np.ndarray, wanted: np.ndarray) -> None:
    """The conditioning proxy: a linear probe fitted on the training set's `name` features, applied to
    the generated images' features, with its ceiling on the reference set's real images."""
    probe = fit_linear_probe(column_array(sets.train_table, feature_column(name)), np.asarray(sets.train_table.column("label")))
    metrics.add("class accuracy (proxy)", float((probe(gen) == wanted).mean()),
                f"linear probe on {name} features of {sets.train.path}")
    ref_labels = np.asarray(sets.table.column("label"))
    metrics.add("class accuracy of real reference images (probe ceiling)",
                float((probe(column_array(sets.table, feature_column(name))) == ref_labels).mean()), f"same probe on {sets.fs.path}")


def _judge_metrics(metrics: _Metrics, sets: _Sets, images: np.ndarray, wanted: np.ndarray, tokenizer_path: str | None,
                   device: str) -> None:
    """The independent judge (a CNN trained on the training set's own images, cached in its stats/):
    FD in its feature space against the class-balanced reference with the real-vs-real floor from
    held-out reference rows (not training rows: the judge has seen those), class accuracy of the
    generated images, and its ceiling on the reference set's real images."""
    from pipeline.metrics.judge import load_or_train
    judge = load_or_train(sets.train, tokenizer_path, table=sets.train_table)
    real, origin = reference_images(sets.fs, tokenizer_path, table=sets.table, device=device)
    space, n, extra = f"independent judge: CNN trained on {sets.train.path}, sha256 {judge.sha256[:12]}", metrics.n, \
        {"judge": judge.describe()}
    ordered = judge.features(real[sets.order])
    ref, spare = (ordered[:-n], ordered[-n:]) if len(ordered) >= 2 * n else (ordered, None)
    metrics.add("FD judge", fd(judge.features(images), ref), f"{space}, reference = {origin}, "
                f"{_describe_order(sets.order[:len(ref)], sets.classes)}", n_reference=len(ref), **extra,
                **real_vs_real(fd, ref, n, spare, sets.held_out, None, ""))
    metrics.add("class accuracy (judge)", float((judge.predict(images) == wanted).mean()), space, **extra)
    if sets.classes is not None:  # a labelled reference
        labels = np.asarray(sets.table.column("label"))
        metrics.add("class accuracy of real reference images (judge ceiling)",
                    float((judge.predict(real) == labels).mean()), f"{space}, on {sets.fs.path}", **extra)
