"""An export's weights lent to ONNX Runtime from edgellm's own memory, so that they stay out of the RSS.

Why: ONNX Runtime repacks every MatMulNBits and Gemm weight into its own layout when a session is
created, so the file's bytes matter only while they are packed. Left to ONNX Runtime, a packed original
stays resident until creation ends (the lm_head's 28 MB on top of everything packed: the peak), and
each page it touches later stays resident for good: the embedding rows of the prompt, each of which
maps a whole page-cache folio (up to 2 MB on a large-folio file system), ~25 MB after 128 tokens.

Here (`MappedWeights`):
- the data file is mapped once, read-only, and lent to ONNX Runtime without a copy
  (`SessionOptions.add_initializer`); its pages are dropped with MADV_DONTNEED while and after the
  session is created. Dropping is safe at any moment: a clean page of a read-only file mapping that is
  read again faults back in with the same bytes.
- the tables gathered by token id (the embedding's blocks and scales) are lent as zero-filled anonymous
  memory instead, and `ensure_rows` reads in, with pread, the rows of the ids a forward is about to
  gather: a few KB per distinct token rather than the table.

The layout comes from the manifest (`graph.initializers`, `graph.token_rows`), so loading needs no
`onnx` import (11 MB). Exports without it, and platforms without `mmap.madvise`, load as before.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, ModelFormatError

SUPPORTED = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


def initializer_table(model: Any, data_file: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """For the manifest: where each external initializer lies in `data_file`, and which are gathered by token id."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    table: dict[str, dict[str, Any]] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != data_file:
            continue
        table[t.name] = {"offset": int(info.get("offset", 0)), "length": int(info["length"]),
                         "dtype": np.dtype(tensor_dtype_to_np_dtype(t.data_type)).name, "shape": list(t.dims)}
    rows = sorted({n.input[0] for n in model.graph.node
                   if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in table})
    return table, rows


class MappedWeights:
    """The external initializers of one export, as arrays edgellm owns (see the module docstring)."""

    def __init__(self, directory: Path, graph: dict[str, Any]) -> None:
        self._fd = -1
        path = directory / graph["external_data"]
        table, token_rows = graph["initializers"], graph.get("token_rows", [])
        if not isinstance(table, dict) or not isinstance(token_rows, list):
            raise ModelFormatError(f"{directory}: manifest graph.initializers should be an object and graph.token_rows "
                                   f"a list")
        self.arrays: dict[str, np.ndarray] = {}
        self._values: dict[str, Any] = {}  # OrtValues lent to sessions: must outlive them
        self._rows: dict[str, tuple[np.ndarray, int]] = {}  # token-row table -> (array, its offset in the file)
        self._filled: np.ndarray | None = None
        self._lock = threading.Lock()
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ModelFormatError(f"{path}: cannot open the external weight data ({exc.strerror})") from None
        size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ) if size else None
        if hasattr(mmap, "MADV_RANDOM") and self._map is not None:
            self._map.madvise(mmap.MADV_RANDOM)  # no read-around: only what is read is brought in
        for name, info in table.items():
            try:
                offset, length, shape = int(info["offset"]), int(info["length"]), tuple(int(d) for d in info["shape"])
                dtype = np.dtype(info["dtype"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelFormatError(f"{directory}: manifest graph.initializers[{name!r}] is malformed ({exc})") from None
            count = int(np.prod(shape, dtype=np.int64))
            if length != count * dtype.itemsize or offset < 0 or offset + length > size or self._map is None:
                raise ModelFormatError(f"{path}: tensor {name!r} ({length} bytes at offset {offset}) does not fit its "
                                       f"shape {list(shape)} or lies past the end of the file ({size} bytes): "
                                       f"truncated or corrupt export")
            if name in token_rows and len(shape) >= 2:
                # MAP_PRIVATE anonymous memory: zero pages cost nothing until a row is written
                anon = mmap.mmap(-1, max(length, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self._rows[name] = (np.frombuffer(anon, dtype=dtype, count=count).reshape(shape), offset)
                self.arrays[name] = self._rows[name][0]
                if self._filled is None:
                    self._filled = np.zeros(shape[0], dtype=bool)
            else:
                self.arrays[name] = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def lend(self, options: Any, initializer_names: set[str] | None = None) -> int:
        """Hand the initializers (all, or those a cut graph keeps) to a session's options; returns how many."""
        import onnxruntime as ort

        lent = 0
        for name, array in self.arrays.items():
            if initializer_names is not None and name not in initializer_names:
                continue
            if name not in self._values:
                self._values[name] = ort.OrtValue.ortvalue_from_numpy(array)
            options.add_initializer(name, self._values[name])
            lent += 1
        return lent

    def ensure_rows(self, ids: np.ndarray) -> None:
        """Read in the token-row tables' rows for `ids` (once each) before a forward gathers them."""
        if self._filled is None:
            return
        ids = np.asarray(ids).ravel()
        vocab = self._filled.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ConfigError(f"token ids must lie in [0, {vocab}), found {int(ids.min())}..{int(ids.max())}")
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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
