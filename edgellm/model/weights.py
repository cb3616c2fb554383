"""Named weights that keep both the file's quantized blocks and a float view.

Exporters transcode the original blocks losslessly; the reference model computes on the float view.
Dequantization is lazy and cached so that loading a model only reads its header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgellm.errors import MissingTensorError


@dataclass
class WeightTensor:
    """One tensor: logical shape in numpy order (rows = output features), storage type, raw bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # "F32", "F16", "BF16", "Q4_1", "Q8_0", "Q4_K", ...
    raw: np.ndarray | None = None  # file blocks as stored (uint8 rows for quantized types)
    blocks: Any = None  # qtype "BLOCKQ": a BlockQuantized a compression pass produced (exporters keep it)
    _dequantize: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _float: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in ("F32", "F16", "BF16", "F64")

    def to_float(self) -> np.ndarray:
        """The float32 values the file encodes, shaped `self.shape`."""
        if self._float is None:
            if self._dequantize is None:
                raise MissingTensorError(f"tensor {self.name} has no data attached")
            values = np.asarray(self._dequantize(), dtype=np.float32).reshape(self.shape)
            self._float = values
        return self._float

    def release_float(self) -> None:
        """Drop the cached float copy (it is 4-8x the size of a quantized tensor) when it can be rebuilt."""
        if self._dequantize is not None:
            self._float = None

    @classmethod
    def from_array(cls, name: str, values: np.ndarray) -> WeightTensor:
        values = np.ascontiguousarray(values, dtype=np.float32)
        return cls(name=name, shape=tuple(values.shape), qtype="F32", raw=values, _float=values)

    @classmethod
    def from_blocks(cls, name: str, blocks: Any) -> WeightTensor:
        """A linear weight held as a pass's block-quantized result; its float view is the dequantization."""
        return cls(name=name, shape=(blocks.n, blocks.k), qtype="BLOCKQ", blocks=blocks, _dequantize=blocks.dequantize)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes) if self.raw is not None else 0


class ModelWeights(Mapping[str, WeightTensor]):
    """Canonical-name -> tensor map (GGUF names: `blk.{i}.attn_q.weight`, `token_embd.weight`, ...)."""

    def __init__(self, tensors: Mapping[str, WeightTensor], source: str = "") -> None:
        self._tensors = dict(tensors)
        self.source = source

    def __getitem__(self, name: str) -> WeightTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(
                f"{self.source or 'model'}: tensor {name!r} is missing ({len(self._tensors)} tensors present)"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def float(self, name: str) -> np.ndarray:
        return self[name].to_float()

    def replace(self, name: str, tensor: WeightTensor) -> None:
        """Swap a tensor (compression passes write their result back this way)."""
        self._tensors[name] = tensor
