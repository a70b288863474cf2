"""`arra-pipe eval`: generated images against a reference feature set.

- FID with the TF-Inception network. The reference side is the set's own images (its source,
  at the recorded canonical crop; tokenizer reconstructions when the source is gone, and the
  report says so); their Inception features are cached in `<set>/stats/` for the next eval.
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
from pipeline.metrics.distribution import fd, fit_linear_probe, precision_recall
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
    source files and crop they came from, and the network file. A re-extracted set or another
    network never meets an old cache."""
    m = fs.manifest
    identity = [shards_digest(m["shards"]), [m["source"].get(k) for k in ("fingerprint", "files_fingerprint")],
                m["preprocess"]]
    return f"{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}-{sha256_file(inception.path)[:12]}"


def reference_inception(fs: FeatureSet, inception, tokenizer_path: str | None, limit: int | None = None,
                        table=None) -> tuple[np.ndarray, str]:
    """Inception features of the (first `limit`) reference images, cached in `<set>/stats/` by
    `reference_key` and count, as float32: a cached FID equals the fresh one."""
    n = min(limit or fs.rows, fs.rows)
    cache = fs.stats_dir() / f"inception-{reference_key(fs, inception)}-{n}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["features"], str(z["origin"])
    images, origin = reference_images(fs, tokenizer_path, n, table=table, device=inception.device)
    feats = inception.features(images)
    cache.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, features=feats, origin=np.array(origin))
    atomic_write_bytes(cache, buf.getvalue())
    return feats, origin


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

    gen_by_teacher = {}
    for name in teachers or list(fs.teachers):
        gen = teacher_features(fs, name, images, teacher_path, device, batch_size)
        ref = column_array(table, feature_column(name))
        gen_by_teacher[name] = gen
        add(f"FD {name}", fd(gen, ref), f"{name} ({fs.teachers[name]['dim']}-d), reference features cached")
        p, r = precision_recall(ref, gen, k, device)
        add(f"precision {name}", p, name, k=k)
        add(f"recall {name}", r, name, k=k)
    if fid:
        from pipeline.models.inception import Inception
        net = Inception(inception_path, device)
        ref_feats, origin = reference_inception(fs, net, tokenizer_path, fid_reference, table)
        gen_feats = net.features(images)
        note = f"FID on {n} < {FID_MIN_IMAGES} generated images is biased upward; compare only at equal n" if n < FID_MIN_IMAGES else ""
        space = f"TF-Inception pool3, reference = {origin}"
        add("FID", fd(gen_feats, ref_feats), space, note=note, n_reference=len(ref_feats))
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
    if train_set and rows and "class" in rows[0]:
        train = FeatureSet.open(train_set)
        name = (teachers or list(fs.teachers))[0]
        train_table = train.table([name] if name in train.columns else [])
        probe = fit_linear_probe(column_array(train_table, feature_column(name)), np.asarray(train_table.column("label")))
        wanted = np.array([r["class"] for r in rows])
        add("class accuracy (proxy)", float((probe(gen_by_teacher[name]) == wanted).mean()),
            f"linear probe on {name} features of {train.path}")
        ref_labels = np.asarray(table.column("label"))
        add("class accuracy of real reference images (probe ceiling)", float((probe(column_array(table, feature_column(name))) == ref_labels).mean()),
            f"same probe on {fs.path}")
    return result
