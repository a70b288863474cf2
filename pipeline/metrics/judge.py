"""The independent judge: a small CNN classifier trained on a labelled feature set's own images.

Eval's teacher-space figures (FD, precision/recall, the linear-probe class accuracy) use the very
network the ARRA arm is trained towards, so part of any gain there is true by construction. The
judge is trained from scratch on the training set's images (at the set's canonical crop, read the
way eval reads reference images: `reference_images`), knows nothing of the teacher, and gives
eval a second opinion: class accuracy of generated images and an FD in its penultimate
(global-pooled) feature space.

Training is seeded and deterministic on the CPU (one thread, the seed fixes init and batch order),
so one set and one config give one set of weights, bit for bit. The weights are cached as
safetensors in the set's `stats/` folder under a key of the set's shards digest, source
fingerprints, crop and the judge's config; a sidecar JSON records their sha256. A cached file that
does not match its recorded sha256 is refused with an error naming it (delete it to retrain): a
changed file is a question to answer, not something to paper over.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.data.featureset import IMAGE, FeatureSet, shards_digest
from pipeline.data.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from pipeline.data.set_images import reference_images
from pipeline.distributed import torch_threads
from pipeline.errors import ArraError


@dataclass(frozen=True)
class JudgeConfig:
    """What the judge's weights depend on besides the set (all part of the cache key)."""

    widths: tuple[int, ...] = (16, 32, 64, 64)  # 61,338 parameters with 10 classes
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-2  # the one-cycle peak
    seed: int = 0
    max_images: int = 10_000  # a seeded subset of a larger set: about 5x the 2,000-image subset's time


class JudgeNet(nn.Module):
    """conv3x3-BN-ReLU blocks (a 2x2 max-pool after all but the last), global average pool, linear.
    Takes uint8 NHWC images; resizes them to the resolution it was trained at."""

    def __init__(self, classes: int, resolution: int, widths=JudgeConfig.widths, channels: int = 3):
        super().__init__()
        layers, prev = [], channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < len(widths) - 1 else []
            prev = w
        self.body, self.head, self.resolution = nn.Sequential(*layers), nn.Linear(prev, classes), resolution

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_judge(images: np.ndarray, labels: np.ndarray, config: JudgeConfig = JudgeConfig()) -> JudgeNet:
    """A judge trained on uint8 (n, h, w, 3) images and integer labels, on the CPU, deterministically."""
    labels = np.asarray(labels, dtype=np.int64)
    x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = JudgeNet(int(labels.max()) + 1, images.shape[1], config.widths)
        order = torch.Generator().manual_seed(config.seed)
        steps = config.epochs * -(-len(x) // config.batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
        net.train()
        for _ in range(config.epochs):
            perm = torch.randperm(len(x), generator=order)
            for i in range(0, len(x), config.batch_size):
                batch = perm[i:i + config.batch_size]
                flip = torch.rand(len(batch), generator=order) < 0.5  # horizontal flips: same class
                xb = torch.where(flip[:, None, None, None], x[batch].flip(2), x[batch])
                loss = F.cross_entropy(net(xb), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
    return net.eval()


class Judge:
    """A trained judge with where it came from: the weights file, its sha256, whether this call
    trained it and how long that took."""

    def __init__(self, net: JudgeNet, path: Path, sha256: str, trained: bool, seconds: float | None = None,
                 cpu_seconds: float | None = None):
        self.net, self.path, self.sha256, self.trained = net, path, sha256, trained
        self.seconds, self.cpu_seconds = seconds, cpu_seconds

    @torch.inference_mode()
    def _run(self, images: np.ndarray, fn, batch_size: int = 512) -> np.ndarray:
        return np.concatenate([fn(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))).numpy()
                               for i in range(0, len(images), batch_size)]) if len(images) else np.zeros((0,))

    def features(self, images: np.ndarray) -> np.ndarray:
        """The penultimate (global-pooled) features, float64 for the FD."""
        return self._run(images, self.net.features).astype(np.float64)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, lambda x: self.net(x).argmax(1))

    def describe(self) -> dict:
        return {"file": str(self.path), "sha256": self.sha256, "trained_now": self.trained, "train_seconds": self.seconds,
                "train_cpu_seconds": self.cpu_seconds}


def judge_key(fs: FeatureSet, config: JudgeConfig) -> str:
    """What a set's judge depends on: its rows (the shards' digest), the source and crop they came
    from, and the judge's config. A re-extracted set or another config never meets an old file."""
    m = fs.manifest
    identity = [shards_digest(m["shards"]), [m["source"].get(k) for k in ("fingerprint", "files_fingerprint")],
                m["preprocess"], asdict(config)]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _training_rows(labels: np.ndarray, config: JudgeConfig) -> np.ndarray:
    rows = np.arange(len(labels))
    if len(rows) > config.max_images:
        rows = np.sort(np.random.default_rng(config.seed).permutation(rows)[:config.max_images])
    return rows


def _load(path: Path, record: Path) -> Judge:
    from safetensors import safe_open
    from safetensors.torch import load_file
    want, got = read_json(record)["sha256"], sha256_file(path)
    if got != want:
        raise ArraError(f"{path}: sha256 {got[:12]} is not the {want[:12]} recorded in {record.name}; the cached "
                        "judge changed since it was trained. Delete both files to retrain it.")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["judge"])
    net = JudgeNet(meta["classes"], meta["resolution"], tuple(meta["config"]["widths"]))
    net.load_state_dict(load_file(str(path)))
    return Judge(net.eval(), path, got, False)


def load_or_train(fs: FeatureSet, tokenizer_path: str | None = None, config: JudgeConfig = JudgeConfig(),
                  table=None, log=lambda m: None) -> Judge:
    """The judge of a labelled set: from `<set>/stats/` when trained before, else trained on the
    set's images at its canonical crop and cached there (weights, then the sha256 record)."""
    from safetensors.torch import save
    path = fs.stats_dir() / f"judge-{judge_key(fs, config)}.safetensors"
    record = path.with_suffix(".json")
    if record.exists():
        return _load(path, record)
    table = table if table is not None else fs.table([c for c in fs.columns if c != IMAGE])
    labels = np.asarray(table.column("label"))
    if len(labels) == 0 or (labels < 0).any():
        raise ArraError(f"{fs.path}: the judge needs a labelled set (every row with a label)")
    rows = _training_rows(labels, config)
    images, origin = reference_images(fs, tokenizer_path, table=table.take(rows))
    start, cpu = time.perf_counter(), time.process_time()
    net = train_judge(images, labels[rows], config)
    seconds, cpu_seconds = round(time.perf_counter() - start, 1), round(time.process_time() - cpu, 1)
    meta = {"classes": net.head.out_features, "resolution": net.resolution, "config": asdict(config), "images": origin,
            "train_rows": len(rows)}  # one key: safetensors writes several in no fixed order, and the bytes must repeat
    data = save({k: v.contiguous() for k, v in net.state_dict().items()}, metadata={"judge": json.dumps(meta, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    sha = hashlib.sha256(data).hexdigest()
    atomic_write_json(record, {"sha256": sha, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
                               "train_rows": len(rows), "images": origin, "config": asdict(config), "set": str(fs.path)})
    log(f"judge: trained on {len(rows)} images of {fs.path} in {seconds} s -> {path}")
    return Judge(net, path, sha, True, seconds, cpu_seconds)
