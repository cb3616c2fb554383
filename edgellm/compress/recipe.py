"""Compression recipes as data: an ordered list of passes with parameters and a seed.

    name = "haq-cpu-ort"
    seed = 0
    [[passes]]
    pass = "allocate"
    formats = ["auto", "int8", "int4-sym", "int2"]

Passes register by name with a frozen parameter dataclass; an unknown pass or parameter is an error
that lists what is valid.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError, unknown_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parents[2] / "models" / "recipes"
PASSES: dict[str, tuple[type, Callable[..., Any]]] = {}


def register_pass(name: str, params: type) -> Callable:
    """Decorator: `@register_pass("quantize", QuantizeParams)` on `run(state, params)`."""

    def wrap(fn: Callable) -> Callable:
        PASSES[name] = (params, fn)
        return fn

    return wrap


@dataclass(frozen=True)
class PassSpec:
    name: str
    params: Any


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[PassSpec, ...]
    seed: int = 0
    description: str = ""


def parse_recipe(data: dict, where: str) -> Recipe:
    _register_builtin_passes()
    for key in ("name", "passes"):
        if key not in data:
            raise ConfigError(f"{where}: recipe field {key!r} is missing")
    specs = []
    for i, entry in enumerate(data["passes"]):
        entry = dict(entry)
        name = entry.pop("pass", None)
        if name not in PASSES:
            raise ConfigError(f"{where}: passes[{i}]: {unknown_name('pass', str(name), list(PASSES))}")
        params_type = PASSES[name][0]
        valid = {f.name for f in fields(params_type)}
        extra = set(entry) - valid
        if extra:
            raise ConfigError(f"{where}: passes[{i}] ({name}): unknown parameter(s) {sorted(extra)}; "
                              f"valid: {', '.join(sorted(valid))}")
        try:
            specs.append(PassSpec(name, params_type(**{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in entry.items()})))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: passes[{i}] ({name}): {exc}") from None
    if not specs:
        raise ConfigError(f"{where}: a recipe needs at least one pass")
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"{where}: seed must be an integer, found {seed!r}")
    return Recipe(name=str(data["name"]), passes=tuple(specs), seed=seed, description=str(data.get("description", "")))


def load_recipe(spec: str | Path) -> Recipe:
    """A recipe file or the name of one in models/recipes/."""
    path = Path(spec)
    if not path.is_file():
        candidates = {p.stem: p for p in RECIPES_DIR.glob("*.toml")}
        if str(spec) not in candidates:
            raise unknown_name("recipe", str(spec), list(candidates))
        path = candidates[str(spec)]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_recipe(data, str(path))


def _register_builtin_passes() -> None:
    import edgellm.compress.distill  # noqa: F401
    import edgellm.compress.passes  # noqa: F401  (registers on import)
    import edgellm.compress.prune  # noqa: F401
    import edgellm.compress.structured  # noqa: F401
