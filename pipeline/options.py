"""Options declared once. A dataclass field made with `option()` carries its default, its command-line
flag, help and allowed values; the CLI builds its click options from the fields and the dataclass
checks the same constraints on construction, so a default or a range lives in one place and the
Python API refuses what the command line refuses."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipeline.errors import ArraError


class OptionError(ArraError):
    """An option outside its allowed values."""


@dataclass(frozen=True)
class Flag:
    help: str
    name: str | None = None           # the flag, when it is not --field-name (e.g. --lambda for `lam`)
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    metavar: str | None = None
    exists: str | None = None         # a path that must exist: "file", "dir" or "any" (checked by the CLI)
    negatable: bool = False           # a boolean as --x/--no-x rather than a bare --x switch
    multiple: bool = False            # a tuple field: the flag is repeated, once per value

    def flag(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")


def option(default, help: str, **flag) -> field:
    """A dataclass field with a default and its command-line flag (see Flag for the keywords)."""
    return field(default=default, metadata={"flag": Flag(help, **flag)})


def flags(cls) -> list[tuple[str, Flag, object]]:
    """(field name, Flag, default) of every field of the dataclass `cls` that has a flag, in order."""
    return [(f.name, f.metadata["flag"], f.default) for f in fields(cls) if "flag" in f.metadata]


def flag_of(cls, field_name: str) -> str:
    """The command-line flag of a field of `cls` (--field-name when it declares none)."""
    spec = next((s for name, s, _ in flags(cls) if name == field_name), None)
    return spec.flag(field_name) if spec else "--" + field_name.replace("_", "-")


def check(obj) -> None:
    """Raise OptionError, naming the flag, for a field of `obj` outside its choices or range."""
    for name, spec, _ in flags(type(obj)):
        value = getattr(obj, name)
        if value is None or isinstance(value, (bool, tuple)):
            continue
        if spec.choices is not None and value not in spec.choices:
            raise OptionError(f"{spec.flag(name)} must be one of {', '.join(map(str, spec.choices))}, not {value!r}")
        low = spec.min is not None and (value <= spec.min if spec.min_open else value < spec.min)
        high = spec.max is not None and (value >= spec.max if spec.max_open else value > spec.max)
        if low or high:
            lo = "" if spec.min is None else f"{'>' if spec.min_open else '>='} {spec.min:g}"
            hi = "" if spec.max is None else f"{'<' if spec.max_open else '<='} {spec.max:g}"
            raise OptionError(f"{spec.flag(name)} must be {' and '.join(s for s in (lo, hi) if s)}, not {value!r}")
