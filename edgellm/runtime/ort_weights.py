"""An export's weights lent to ONNX Runtime from edgellm's own memory, so that they stay out of the RSS.

Why: in the stock-op lowering (`--kernel matmulnbits`) ONNX Runtime repacks every MatMulNBits and
Gemm weight into its own layout when a session is created, so the file's bytes matter only while they
are packed. (The default export's BlockMatMul/BlockGather read the lent blocks in place at run time:
there the mapping simply is the resident copy, as llama.cpp's mmap is.) Left to ONNX Runtime, a packed original
stays resident until creation ends (the lm_head's 28 MB on top of everything packed: the peak), and
each page it touches later stays resident for good: the embedding rows of the prompt, each of which
maps a whole page-cache folio (up to 2 MB on a large-folio file system), ~25 MB after 128 tokens.

Here (`MappedWeights`):
- the data file is mapped once, read-only, and lent to ONNX Runtime without a copy
  (`SessionOptions.add_initializer`); its pages are dropped with MADV_DONTNEED while and after the
  session is created. Dropping is safe at any moment: a clean page of a read-only file mapping (never
  written) that is read again faults back in with the same bytes.
- the tables used only to gather by token id (the embedding's blocks and scales) are lent as
  zero-filled anonymous memory instead, and `ensure_rows` reads in, with pread, the rows of the ids a
  forward is about to gather: a few KB per distinct token rather than the table. ONNX Runtime must
  read them in place (checked: a copy would gather zeros).

The layout comes from the manifest (`graph.initializers`, `graph.token_rows`, written by the exporter),
so loading needs no `onnx` import (11 MB); every entry is checked against the file before use.
Exports without it, and platforms without `mmap.madvise`/`os.preadv`, load as before.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, ModelFormatError

SUPPORTED = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED") and hasattr(os, "preadv")


def _entry(path: Path, name: str, info: Any, size: int) -> tuple[int, int, np.dtype, tuple[int, ...]]:
    """One manifest table entry, checked: (offset, length, dtype, shape)."""
    bad = f"{path.parent}: manifest graph.initializers[{name!r}] is malformed"
    if not isinstance(info, dict) or not {"offset", "length", "dtype", "shape"} <= info.keys():
        raise ModelFormatError(f"{bad} (needs offset, length, dtype and shape)")
    offset, length, shape = info["offset"], info["length"], info["shape"]
    if not (type(offset) is int and type(length) is int and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape) and offset >= 0 and length >= 0):
        raise ModelFormatError(f"{bad} (offset, length and dimensions must be non-negative integers)")
    try:
        dtype = np.dtype(info["dtype"]) if isinstance(info["dtype"], str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or not dtype.isnative:
        raise ModelFormatError(f"{bad} (dtype {info['dtype']!r} is not a native numeric type)")
    count = 1
    for d in shape:
        count *= d
    if length != count * dtype.itemsize or offset + length > size:
        raise ModelFormatError(f"{path}: tensor {name!r} ({length} bytes at offset {offset}) does not fit its "
                               f"shape {shape} or lies past the end of the file ({size} bytes): truncated or "
                               f"corrupt export")
    return offset, length, dtype, tuple(shape)


class MappedWeights:
    """The external initializers of one export, as arrays edgellm owns (see the module docstring)."""

    def __init__(self, directory: Path, graph: dict[str, Any]) -> None:
        self._fd = -1
        self._map: mmap.mmap | None = None
        path = directory / graph["external_data"]
        table, token_rows = graph["initializers"], graph.get("token_rows", [])
        if not isinstance(table, dict) or not isinstance(token_rows, list):
            raise ModelFormatError(f"{directory}: manifest graph.initializers should be an object and graph.token_rows "
                                   f"a list")
        if not set(token_rows) <= table.keys() or len(set(token_rows)) != len(token_rows):
            raise ModelFormatError(f"{directory}: manifest graph.token_rows names tensors missing from "
                                   f"graph.initializers, or names one twice")
        self.arrays: dict[str, np.ndarray] = {}
        self._values: dict[str, Any] = {}  # OrtValues lent to sessions: must outlive them
        self._rows: dict[str, tuple[np.ndarray, int]] = {}  # token-row table -> (array, its offset in the file)
        self._filled: np.ndarray | None = None
        self._lock = threading.Lock()
        try:
            self._fd = os.open(path, os.O_RDONLY)
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
                raise ModelFormatError(f"{path}: the external weight data is not a non-empty regular file")
            self._map = mmap.mmap(self._fd, info.st_size, access=mmap.ACCESS_READ)  # read-only, never written
            for name, entry in table.items():
                offset, length, dtype, shape = _entry(path, name, entry, info.st_size)
                if name in token_rows:
                    self._add_token_rows(name, offset, length, dtype, shape, path)
                else:
                    self.arrays[name] = np.frombuffer(self._map, dtype=dtype, count=length // dtype.itemsize,
                                                      offset=offset).reshape(shape)
        except OSError as exc:
            self.close()
            raise ModelFormatError(f"{path}: cannot map the external weight data ({exc.strerror})") from None
        except BaseException:
            self.close()
            raise

    def _add_token_rows(self, name: str, offset: int, length: int, dtype: np.dtype, shape: tuple[int, ...],
                        path: Path) -> None:
        """A table read row by row: zero-filled private anonymous memory, rows read in by `ensure_rows`."""
        if len(shape) < 2 or (self._filled is not None and self._filled.shape[0] != shape[0]):
            raise ModelFormatError(f"{path}: token-row table {name!r} has shape {list(shape)}; token-row tables need "
                                   f"two or more dimensions and the same number of rows")
        anon = mmap.mmap(-1, max(length, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            anon.madvise(mmap.MADV_NOHUGEPAGE)  # with THP "always", one row written would make 2 MB resident
        table = np.frombuffer(anon, dtype=dtype, count=length // dtype.itemsize).reshape(shape)
        self._rows[name] = (table, offset)
        self.arrays[name] = table
        if self._filled is None:
            self._filled = np.zeros(shape[0], dtype=bool)

    def lend(self, options: Any, initializer_names: set[str] | None = None) -> int:
        """Hand the initializers (all, or those a cut graph keeps) to a session's options; returns how many."""
        import onnxruntime as ort

        lent = 0
        for name, array in self.arrays.items():
            if initializer_names is not None and name not in initializer_names:
                continue
            if name not in self._values:
                value = ort.OrtValue.ortvalue_from_numpy(array)
                if name in self._rows and value.data_ptr() != array.ctypes.data:  # rows written later must reach ORT
                    raise RuntimeError(f"ONNX Runtime copied the token-row table {name!r}; it would gather zeros")
                self._values[name] = value
            options.add_initializer(name, self._values[name])
            lent += 1
        return lent

    def ensure_rows(self, ids: np.ndarray) -> None:
        """Read in the token-row tables' rows for `ids` (once each) before a forward gathers them."""
        if self._filled is None:
            return
        ids = np.asarray(ids).ravel()
        vocab = self._filled.shape[0]
        if ids.size == 1 and 0 <= int(ids[0]) < vocab and self._filled[int(ids[0])] and self._fd >= 0:
            return  # the decode step's usual case, kept cheap (~1 us)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ConfigError(f"token ids must lie in [0, {vocab}), found {int(ids.min())}..{int(ids.max())}")
        if self._fd < 0:
            raise ConfigError("the export's weights were closed; load the model again")
        # Read without the lock: a flag is set only after its rows are written (ordered by the GIL; a
        # free-threaded build would need the lock here too).
        missing = np.unique(ids[~self._filled[ids]])
        if not missing.size:
            return
        with self._lock:
            for token in missing.tolist():
                if self._filled[token]:
                    continue
                for table, offset in self._rows.values():
                    row = table[token]
                    got = os.preadv(self._fd, [memoryview(row).cast("B")], offset + token * row.nbytes)
                    if got != row.nbytes:
                        raise ModelFormatError(f"short read of token {token}'s row of the embedding (file changed?)")
                self._filled[token] = True

    def drop_pages(self) -> None:
        """Release the resident pages of the file mapping; whatever is read again faults back in."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    @contextmanager
    def dropping_pages(self, every_s: float = 0.001) -> Iterator[None]:
        """Drop pages every `every_s` while the body (session creation: packing) runs, and once after it."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(every_s):
                self.drop_pages()

        worker = threading.Thread(target=loop, name="edgellm-drop-pages", daemon=True)
        worker.start()
        try:
            yield
        finally:
            done.set()
            worker.join()
            self.drop_pages()

    def close(self) -> None:
        """Close the file; the mapping stays as long as arrays lent to ONNX Runtime sessions point into it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
