"""Named teachers and tokenizers, described by TOML files in `manifests/`.

A manifest names a `loader` (a class registered with `@register`) plus everything that class
needs: weights location, input size, normalisation, output dim. Adding a model of a known family
is one new manifest file; a new family is one loader module in this folder. A path to a .toml file works wherever
a name does.
"""

from __future__ import annotations

import importlib
import importlib.resources
import pkgutil
import tomllib
from pathlib import Path

from pipeline.errors import ArraError

KINDS = ("teachers", "tokenizers", "caption_encoders")
LOADERS: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}


class RegistryError(ArraError):
    """Unknown name, bad manifest or weights that cannot be found."""


def register(kind: str, loader: str):
    """Class decorator: make `cls` the loader for manifests with `loader = "<loader>"`."""
    def wrap(cls):
        LOADERS[kind][loader] = cls
        return cls
    return wrap


def manifest_dir(kind: str) -> Path:
    return Path(str(importlib.resources.files("manifests"))) / kind


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in manifest_dir(kind).glob("*.toml"))


def read_manifest(kind: str, name: str) -> tuple[Path, dict]:
    """(path, contents) of manifests/<kind>/<name>.toml, or of `name` itself when it is a .toml path."""
    path = Path(name)
    if not (name.endswith(".toml") and path.is_file()):
        path = manifest_dir(kind) / f"{name}.toml"
        if not path.is_file():
            raise RegistryError(f"unknown {kind[:-1]} {name!r}; known: {', '.join(available(kind))} "
                                f"(or pass a path to a .toml manifest)")
    with open(path, "rb") as f:
        return path, tomllib.load(f)


def option_names(table: dict) -> dict:
    """TOML keys written as command-line flags (`align-layer`, `lambda`) -> Python names."""
    return {("lam" if k == "lambda" else k.replace("-", "_")): v for k, v in table.items()}


def load_spec(kind: str, name: str) -> dict:
    """The manifest for `name` (a shipped name or a path to a .toml file) as a dict."""
    path, spec = read_manifest(kind, name)
    spec.setdefault("name", path.stem)
    if spec.get("loader") not in loaders(kind):
        raise RegistryError(f"{path}: loader {spec.get('loader')!r} is not one of {sorted(LOADERS[kind])}")
    return spec


def loaders(kind: str) -> dict[str, type]:
    """Loader name -> class, with every module of this folder imported: a loader registers on import,
    so a new family is one module dropped in here, listed nowhere else."""
    import pipeline.models
    for module in pkgutil.iter_modules(pipeline.models.__path__, "pipeline.models."):
        importlib.import_module(module.name)
    return LOADERS[kind]


def build(kind: str, name: str, weights: str | None = None, **options):
    """Instantiate the teacher, tokenizer or caption encoder `name` with its weights loaded."""
    from pipeline.models.weights import resolve
    spec = load_spec(kind, name)
    return LOADERS[kind][spec["loader"]](spec, resolve(kind, spec, weights), **options)


def load_recipe(name: str) -> dict:
    """A training or sampling recipe (manifests/recipes/<name>.toml or a path) as option defaults."""
    _, recipe = read_manifest("recipes", name)
    recipe.pop("description", None)
    return option_names(recipe)
