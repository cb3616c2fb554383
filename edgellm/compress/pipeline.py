"""Run a recipe's passes in order and write the compressed model directory.

A compressed directory holds `compressed.json`: the source model (path, size, sha256), the recipe,
the resulting plan and each pass's report. Weights stay in the source file while passes only choose
formats; `edgellm export onnx DIR` applies the plan. Tensors a pass rewrote go to weights.npz: block-
quantized ones (GPTQ) in the exporters' block format, float ones (pruning, distillation) as float32.
When structured pruning changed per-layer shapes, compressed.json records them under "layer_shapes".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from edgellm import __version__
from edgellm.compress.passes import CompressState
from edgellm.compress.plan import CompressionPlan
from edgellm.compress.recipe import PASSES, Recipe
from edgellm.errors import ConfigError, ModelFormatError
from edgellm.model.artifact import sha256_file
from edgellm.model.description import ModelDescription

COMPRESSED_MANIFEST = "compressed.json"
COMPRESSED_FORMAT = "edgellm-compressed"
WEIGHTS_FILE = "weights.npz"  # tensors a pass rewrote (GPTQ blocks, pruned/distilled floats)
LAYER_SHAPE_FIELDS = ("layer_n_heads", "layer_n_kv_heads", "layer_ffn_sizes")


def run_recipe(state: CompressState, recipe: Recipe) -> CompressState:
    for spec in recipe.passes:
        _, fn = PASSES[spec.name]
        fn(state, spec.params)
    return state


def write_compressed(state: CompressState, recipe: Recipe, out_dir: str | Path, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    source = Path(state.model.source)
    manifest = {
        "format": COMPRESSED_FORMAT, "edgellm_version": __version__,
        "source": {"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": sha256_file(source)},
        "recipe": {"name": recipe.name, "seed": recipe.seed,
                   "passes": [{"pass": s.name, **asdict(s.params)} for s in recipe.passes]},
        "plan": state.plan.to_dict(),
        "report": state.report,
    }
    earlier = state.model.metadata.get("compressed")
    if isinstance(earlier, dict):  # compressed from a compressed directory: keep the chain of recipes
        manifest["based_on"] = {k: earlier.get(k) for k in ("recipe", "report", "based_on") if k in earlier}
    cfg = state.model.config
    if not cfg.uniform:
        manifest["layer_shapes"] = {k: list(getattr(cfg, k)) for k in LAYER_SHAPE_FIELDS}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "plan.json").write_text(json.dumps(state.plan.to_dict(), indent=2))
        weights = state.model.weights
        quantized = {n: t.blocks for n, t in weights.items() if t.qtype == "BLOCKQ"}
        # rewritten here, or by the recipe that made the compressed directory this model was loaded from
        changed = state.rewritten | set(state.model.metadata.get("rewritten", ()))
        floats = {n: weights.float(n) for n in sorted(changed) if n in weights and n not in quantized}
        if quantized or floats:
            _save_blocks(quantized, tmp / WEIGHTS_FILE, floats)
            manifest["weights"] = {"file": WEIGHTS_FILE, "tensors": sorted(quantized),
                                   "float_tensors": sorted(floats), "sha256": sha256_file(tmp / WEIGHTS_FILE)}
        (tmp / COMPRESSED_MANIFEST).write_text(json.dumps(manifest, indent=2, default=list))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_compressed(path: Path) -> bool:
    return path.is_dir() and (path / COMPRESSED_MANIFEST).is_file()


def load_compressed(path: Path, verify: bool = True) -> ModelDescription:
    """The source model with the plan attached (metadata["plan"]), checked against its recorded checksum."""
    from edgellm.model.loader import load_model

    try:
        manifest = json.loads((path / COMPRESSED_MANIFEST).read_text())
        source = Path(manifest["source"]["path"])
        plan = CompressionPlan.from_dict(manifest["plan"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{path / COMPRESSED_MANIFEST}: corrupt ({type(exc).__name__}: {exc})") from None
    if not source.is_file():
        raise ModelFormatError(f"{path}: its source model {source} is missing")
    if verify and sha256_file(source) != manifest["source"]["sha256"]:
        raise ModelFormatError(f"{path}: source model {source} changed since compression (sha256 mismatch)")
    model = load_model(source)
    if "layer_shapes" in manifest:  # structured pruning: the per-layer shapes the saved tensors have
        try:
            shapes = {k: tuple(manifest["layer_shapes"][k]) for k in LAYER_SHAPE_FIELDS}
            model.config = dataclasses.replace(model.config, **shapes)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{path / COMPRESSED_MANIFEST}: bad layer_shapes ({exc})") from None
    if "weights" in manifest:
        passes = "+".join(str(p.get("pass")) for p in manifest.get("recipe", {}).get("passes", []))
        _load_blocks(path, manifest["weights"], model, label=passes or "pass")
    model.validate()  # every tensor (rewritten or from the source) has the shape the config says
    model.metadata["plan"] = plan
    model.metadata["compressed"] = manifest
    return model


def _save_blocks(blocks: dict, path: Path, floats: dict | None = None) -> None:
    import numpy as np

    arrays = {f"{name}|f32": np.ascontiguousarray(v, dtype=np.float32) for name, v in (floats or {}).items()}
    for name, b in blocks.items():
        arrays[f"{name}|packed"] = b.packed
        arrays[f"{name}|meta"] = np.array([b.n, b.k, b.bits, b.block_size, b.zero_point], dtype=np.int64)
        arrays.update(_compact_scales(name, b))
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _compact_scales(name: str, b) -> dict:
    """fp16 scales (and fp16 minima, from which the offsets m + z*d are rebuilt) when that is exact, as
    RTN and GPTQ produce them; fp32 otherwise (e.g. a pass that computes free-form scales)."""
    import numpy as np

    s16 = b.scales.astype(np.float16)
    if not np.array_equal(s16.astype(np.float32), b.scales):
        out = {f"{name}|scales": b.scales}
        if b.block_offsets is not None:
            out[f"{name}|offsets"] = b.block_offsets
        return out
    out = {f"{name}|scales16": s16}
    if b.block_offsets is not None:
        mins = (b.block_offsets - b.zero_point * b.scales.T).astype(np.float16)
        if np.array_equal(_offsets(mins, s16, b.zero_point), b.block_offsets):
            out[f"{name}|mins16"] = mins
        else:
            out[f"{name}|offsets"] = b.block_offsets
    return out


def _offsets(mins16, scales16, zero_point: int):
    import numpy as np

    return (mins16.astype(np.float32) + zero_point * scales16.T.astype(np.float32)).astype(np.float32)


def _read_scales(data, name: str, zero_point: int):
    """(scales, offsets or None) as _compact_scales wrote them."""
    if f"{name}|scales16" in data:
        s16 = data[f"{name}|scales16"]
        offsets = _offsets(data[f"{name}|mins16"], s16, zero_point) if f"{name}|mins16" in data else None
        if offsets is None and f"{name}|offsets" in data:
            offsets = data[f"{name}|offsets"]
        return s16.astype("float32"), offsets
    return data[f"{name}|scales"], (data[f"{name}|offsets"] if f"{name}|offsets" in data else None)


def _load_blocks(directory: Path, info: dict, model: ModelDescription, label: str) -> None:
    import numpy as np

    from edgellm.export.block_formats import BlockQuantized
    from edgellm.model.tensor_names import expected_shapes
    from edgellm.model.weights import WeightTensor

    path = directory / str(info.get("file", WEIGHTS_FILE))
    if not path.is_file() or sha256_file(path) != info.get("sha256"):
        raise ModelFormatError(f"{path}: missing or changed since compression (checksum mismatch)")
    expected = expected_shapes(model.config)
    with np.load(path) as data:
        for name in info.get("float_tensors", []):
            if f"{name}|f32" not in data or expected.get(name) != tuple(data[f"{name}|f32"].shape):
                raise ModelFormatError(f"{path}: float tensor {name} is missing or does not match the model "
                                       f"(expected shape {expected.get(name)})")
            model.weights.replace(name, WeightTensor.from_array(name, data[f"{name}|f32"]))
            model.metadata.setdefault("rewritten", set()).add(name)
        for name in info["tensors"]:
            try:
                n, k, bits, block, zp = (int(v) for v in data[f"{name}|meta"])
                scales, offsets = _read_scales(data, name, zp)
                b = BlockQuantized(n, k, bits, block, data[f"{name}|packed"], scales, zp, offsets,
                                   source=f"int{bits} {label}")
            except KeyError as exc:
                raise ModelFormatError(f"{path}: tensor {name} is incomplete ({exc})") from None
            if expected.get(name) != (n, k):
                raise ModelFormatError(f"{path}: tensor {name} does not match the model (expected shape "
                                       f"{expected.get(name)}, found {(n, k)})")
            model.weights.replace(name, WeightTensor.from_blocks(name, b))
            model.metadata.setdefault("rewritten", set()).add(name)
