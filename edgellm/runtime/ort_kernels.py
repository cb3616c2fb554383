"""edgellm's own ONNX Runtime kernels: built from the C++ sources in `kernels/` at first use.

Why build here rather than ship a binary: the kernels are compiled with -march=native for the board
they run on (AVX-512 VNNI, AVX2, Arm NEON with or without dotprod, or plain C), the way
llama-cpp-python builds llama.cpp. The library
is cached per source, compiler and CPU, written atomically, so concurrent first uses are safe.

The ops (domain `com.edgellm`), attributes K, N (rows of W) and `format` ("Q4_0", "Q4_1", "Q8_0"):
  BlockMatMul(A float (..., K), B uint8 (ceil(N/8), K/32 * 8 * block bytes)) -> (..., N)   A @ W^T
  BlockGather(ids int64 (...), B as above) -> (..., K)                                     rows of W
B holds the GGUF blocks in the "x8" layout (edgellm.export.block_formats.interleave_x8).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgellm.errors import ConfigError
from edgellm.export.block_formats import GGUF_BLOCK_BYTES

log = logging.getLogger(__name__)

DOMAIN = "com.edgellm"
SOURCES = ("block_matmul.cpp", "ort_block_matmul.cpp")
HEADERS = ("block_matmul.h", "ort_abi.h")
FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}  # the kernels' BlockFormat codes
_KERNEL_DIR = Path(__file__).with_name("kernels")


class KernelBuildError(ConfigError):
    """The custom-op library could not be compiled on this machine."""


@dataclass(frozen=True)
class KernelLibrary:
    path: Path
    isa: str  # "avx512-vnni", "avx2", "neon-dotprod", "neon" or "scalar"
    handle: ctypes.CDLL = field(repr=False, compare=False)  # the loaded library (ONNX Runtime shares it)


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def cache_dir() -> Path:
    root = os.environ.get("EDGELLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgellm")
    return Path(root) / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelBuildError("edgellm's ONNX Runtime kernels need a C++ compiler (g++ or clang++; set CXX), "
                           "or export with --kernel matmulnbits for a graph of stock ONNX Runtime ops")


@lru_cache(maxsize=4)
def build(march: str = "native") -> KernelLibrary:
    """The compiled library for this machine, compiled on first use (about a second) and cached on disk."""
    cxx = _compiler()
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((_KERNEL_DIR / name).read_bytes())
    digest.update(f"{cxx}|{' '.join(_flags(march))}|{_cpu_key()}".encode())
    out = cache_dir() / digest.hexdigest()[:16] / "libedgellm_ort_ops.so"
    if not out.exists():
        compile_library(out, cxx, march)
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as exc:
        raise KernelBuildError(f"cannot load edgellm's kernel library {out}: {exc} (delete it to rebuild, "
                               f"or set EDGELLM_CACHE to a directory of your own)") from None
    lib.edgellm_kernel_isa.restype = ctypes.c_char_p
    built = KernelLibrary(out, lib.edgellm_kernel_isa().decode(), lib)
    if built.isa == "scalar" and march == "native":
        log.warning("edgellm's BlockMatMul has no SIMD path for this CPU (plain C, slow); export with "
                    "--kernel matmulnbits to use ONNX Runtime's own kernels here")
    return built


def _flags(march: str) -> list[str]:
    # -ffp-contract=off: dequantization stays d*q + m in two roundings, like gguf's own
    return ["-O3", f"-march={march}", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off"]


def compile_library(out: Path, cxx: str, march: str = "native") -> None:
    """Compile the sources into `out`, atomically (a concurrent first use sees all of it or none)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.partial")
    except OSError as exc:
        raise KernelBuildError(f"cannot write edgellm's kernel library under {out.parent}: {exc} "
                               f"(set EDGELLM_CACHE to a writable directory)") from None
    os.close(fd)
    cmd = [cxx, *_flags(march), "-o", tmp, *(str(_KERNEL_DIR / s) for s in SOURCES)]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise KernelBuildError(f"cannot run the C++ compiler {cxx!r}: {exc}") from None
        if proc.returncode != 0:
            raise KernelBuildError(f"compiling edgellm's ONNX Runtime kernels failed ({' '.join(cmd)}):\n"
                                   f"{proc.stderr[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0600 would survive the linker: others could not load it
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Held from registration until the session exists: its kernels copy the thread count when they are created.
REGISTRATION = threading.RLock()


@contextmanager
def registered(opts, threads: int | None = None):
    """register(), holding the process-wide thread setting until the block (creating the session) ends."""
    with REGISTRATION:
        register(opts, threads)
        yield


def register(opts, threads: int | None = None) -> None:
    """Make a SessionOptions able to run graphs with com.edgellm ops (building the library if needed)."""
    library = build()
    try:
        opts.register_custom_ops_library(str(library.path))
    except Exception as exc:  # ONNX Runtime's own error types: a foreign or damaged library
        raise KernelBuildError(f"ONNX Runtime refused edgellm's kernel library {library.path}: "
                               f"{str(exc).splitlines()[0]}") from None
    set_threads(threads or opts.intra_op_num_threads or os.cpu_count() or 1)


def set_threads(threads: int) -> None:
    """Split each product into this many tasks (the session's intra-op threads); one setting per process."""
    _lib().edgellm_set_threads(ctypes.c_int(int(threads)))


def _check(blocks: np.ndarray, fmt: str, n: int, k: int) -> np.ndarray:
    if fmt not in FORMATS:
        raise ConfigError(f"block format {fmt!r} unknown; valid: {', '.join(FORMATS)}")
    if k <= 0 or k % 32 or blocks.shape != (-(-n // 8), k // 32 * 8 * GGUF_BLOCK_BYTES[fmt]):
        raise ConfigError(f"{fmt} x8 blocks of shape {blocks.shape} do not hold {n} rows of K={k}")
    return np.ascontiguousarray(blocks, dtype=np.uint8)


def _lib(library: KernelLibrary | None = None) -> ctypes.CDLL:
    return (library or build()).handle


def block_matmul(x: np.ndarray, blocks: np.ndarray, fmt: str, n: int,
                 library: KernelLibrary | None = None) -> np.ndarray:
    """x (M, K) @ W^T for W's n rows in the x8 layout (block_formats.interleave_x8): BlockMatMul's
    arithmetic on one thread, without ONNX Runtime (tests and tools)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m, k = x.shape
    blocks = _check(blocks, fmt, n, k)
    y = np.empty((m, n), dtype=np.float32)
    ptr = ctypes.c_void_p
    _lib(library).edgellm_block_matmul(x.ctypes.data_as(ptr), ctypes.c_int64(m), ctypes.c_int64(k),
                                blocks.ctypes.data_as(ptr), ctypes.c_int(FORMATS[fmt]), ctypes.c_int64(n),
                                y.ctypes.data_as(ptr))
    return y


def dequantize(blocks: np.ndarray, fmt: str, n: int, k: int, library: KernelLibrary | None = None) -> np.ndarray:
    """All n rows of x8-layout weights as float32 (N, K): what BlockGather returns per row."""
    blocks = _check(blocks, fmt, n, k)
    out = np.empty((n, k), dtype=np.float32)
    ptr = ctypes.c_void_p
    _lib(library).edgellm_dequantize_rows(blocks.ctypes.data_as(ptr), ctypes.c_int(FORMATS[fmt]), ctypes.c_int64(k),
                                   ctypes.c_int64(n), out.ctypes.data_as(ptr))
    return out
