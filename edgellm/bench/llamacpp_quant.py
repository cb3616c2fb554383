"""llama.cpp's own quantization types, made by llama.cpp's own quantizer, measured through edgellm's evaluator.

`requantize` calls `llama_model_quantize` (llama-cpp-python) with llama.cpp's default parameters and
`allow_requantize` set (the source is already quantized: the shipped SmolLM2 GGUF is Q4_1, so every type
here is made from Q4_1 weights, exactly as `llama-quantize --allow-requantize` would). Results are cached
per source file (by sha256) under ~/.cache/edgellm/llamacpp-quant and written atomically.

llama.cpp picks each tensor's type itself: for this model most linears have K = 576, not a multiple of the
K-quants' 256-weight super-block, so llama.cpp falls back to Q4_0/Q5_0/Q5_1/Q8_0 for them (Q3_K_M is
mostly Q4_0 here). `gguf_sizes` reports what each file really holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from edgellm.errors import ConfigError, missing_extra, unknown_name
from edgellm.model.tensor_names import LINEAR_ROLES

log = logging.getLogger(__name__)

# the types issue 4 compares against, in increasing size
DEFAULT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise missing_extra("llama-cpp-python", "bench") from exc
    return llama_cpp


def type_names() -> list[str]:
    """Every file type llama-cpp-python's quantizer knows (e.g. Q4_K_M), from its LLAMA_FTYPE_MOSTLY_* constants."""
    return sorted(n[len(FTYPE_PREFIX):] for n in dir(_llama_cpp()) if n.startswith(FTYPE_PREFIX))


def ftype(name: str) -> int:
    """llama.cpp's ftype constant for a type name such as "Q3_K_M"; an unknown name lists the valid ones."""
    llama_cpp = _llama_cpp()
    if not hasattr(llama_cpp, FTYPE_PREFIX + name):
        raise unknown_name("llama.cpp quantization type", name, type_names())
    return int(getattr(llama_cpp, FTYPE_PREFIX + name))


def cache_dir() -> Path:
    root = os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm"
    return Path(root) / "llamacpp-quant"


def requantize(source: str | Path, type_name: str, out_dir: str | Path | None = None, threads: int = 2) -> Path:
    """The GGUF `source` quantized by llama.cpp to `type_name`; cached, written atomically."""
    from edgellm.model.artifact import sha256_file

    source = Path(source)
    code = ftype(type_name)  # an unknown name fails before any work
    if not source.is_file():
        raise ConfigError(f"{source}: no such GGUF file")
    directory = Path(out_dir) if out_dir is not None else cache_dir()
    out = directory / f"{source.stem}.{sha256_file(source)[:16]}.{type_name}.gguf"
    if out.is_file():
        return out
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=directory)
    os.close(fd)
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True  # the source is already quantized (llama-quantize --allow-requantize)
    params.nthread = threads
    log_text = io.StringIO()
    try:
        with contextlib.redirect_stderr(log_text), contextlib.redirect_stdout(log_text):
            rc = llama_cpp.llama_model_quantize(str(source).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0 or Path(tmp).stat().st_size == 0:
            tail = " | ".join(log_text.getvalue().strip().splitlines()[-3:])
            raise ConfigError(f"llama.cpp could not quantize {source} to {type_name} (code {rc}): {tail}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("llama.cpp %s: %s (%d bytes)", type_name, out, out.stat().st_size)
    return out


@dataclass(frozen=True)
class GgufSizes:
    file_bytes: int
    linear_bytes: int  # the blk.*.{attn_q,k,v,output,ffn_gate,up,down} tensors as stored
    linear_weights: int
    tensor_types: dict[str, int]  # storage type -> number of linear tensors
    embedding_type: str

    @property
    def linear_bits_per_weight(self) -> float:
        return 8 * self.linear_bytes / self.linear_weights

    def to_dict(self) -> dict:
        return {**asdict(self), "linear_bits_per_weight": self.linear_bits_per_weight}


def gguf_sizes(path: str | Path) -> GgufSizes:
    """Whole-file bytes and the linear layers' bytes and types, read from the GGUF's tensor table."""
    from gguf import GGUFReader

    path = Path(path)
    reader = GGUFReader(path)
    roles = {f"{r}.weight" for r in LINEAR_ROLES}
    linear_bytes = linear_weights = 0
    types: Counter[str] = Counter()
    embedding = ""
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            embedding = t.tensor_type.name
        parts = t.name.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in roles:
            linear_bytes += int(t.n_bytes)
            linear_weights += int(t.n_elements)
            types[t.tensor_type.name] += 1
    if linear_weights == 0:
        raise ConfigError(f"{path}: no linear layer tensors (blk.N.attn_q.weight, ...) in this GGUF")
    return GgufSizes(path.stat().st_size, linear_bytes, linear_weights, dict(sorted(types.items())), embedding)


def llamacpp_perplexity(path: str | Path, token_ids, window: int = 512, threads: int = 2) -> float:
    """Perplexity of a GGUF on llama.cpp through edgellm's own evaluator (edgellm.bench.perplexity)."""
    from edgellm.bench.perplexity import perplexity
    from edgellm.model.loader import load_model
    from edgellm.runtime.registry import create_backend

    backend = create_backend("llama.cpp", load_model(path), threads=threads, logits_all=True)
    return perplexity(backend, token_ids, window=window).ppl
