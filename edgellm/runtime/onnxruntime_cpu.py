"""ONNX Runtime CPU backend for exported artifact directories.

Each session preallocates its KV cache once (one OrtValue per layer and kind, `max_tokens` long) and
binds it as both the past input and the present output of GroupQueryAttention, which then appends
new keys/values in place: no per-token reallocation, no copy of the cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, ModelFormatError, missing_extra
from edgellm.model.artifact import read_manifest, verify_files
from edgellm.model.config import ModelConfig
from edgellm.model.description import ModelDescription
from edgellm.runtime.backend import Backend, LayerRange, Session

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("onnxruntime", "ort") from exc


class OrtSession(Session):
    def __init__(self, backend: OrtBackend, layers: LayerRange, max_tokens: int) -> None:
        super().__init__(layers, max_tokens)
        self.backend = backend
        cfg = backend.config
        self.binding = backend.session.io_binding()
        # logits is bound first so that it stays output 0 of the binding when re-bound per call
        self._decode_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, cfg.vocab_size), np.float32, "cpu", 0)
        self.binding.bind_ortvalue_output("logits", self._decode_logits)
        self._cache = []
        for i in range(cfg.n_layers):
            shape = (1, cfg.n_kv_heads_at(i), max_tokens, cfg.head_dim)  # per layer: pruning may differ
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
                self._cache.append(buf)
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)

    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray:
        ids = np.asarray(inputs, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        total = self.position + n
        b = self.binding
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        keep = n if all_logits else 1
        b.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        if keep == 1:
            b.bind_ortvalue_output("logits", self._decode_logits)
        else:
            b.bind_output("logits", "cpu")
        self.backend.session.run_with_iobinding(b)
        if keep == 1:
            return self._decode_logits.numpy().reshape(1, -1).copy()
        return b.get_outputs()[0].numpy().reshape(keep, -1)

    def _truncate(self, n_tokens: int) -> None:
        pass  # GroupQueryAttention reads only the first seqlens_k + 1 cached positions


class OrtBackend(Backend):
    name = "onnxruntime"
    supports_layer_ranges = False  # a layer-range graph cut arrives with the offloader

    def __init__(self, config: ModelConfig, directory: Path, threads: int | None = None,
                 optimization: str = "all", verify: bool = True, profile_dir: str | None = None) -> None:
        super().__init__(config)
        manifest = read_manifest(directory)
        if manifest["backend"] != self.name:
            raise ConfigError(f"{directory} is an export for {manifest['backend']!r}, not {self.name!r}")
        if verify:
            verify_files(directory, manifest)
        self.directory = directory
        self.manifest = manifest
        self.threads = threads or (os.cpu_count() or 1)
        self.session = self._create(directory / manifest["graph"]["model"], optimization, profile_dir)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _create(self, path: Path, optimization: str, profile_dir: str | None) -> Any:
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise ConfigError(f"optimization {optimization!r} unknown; valid: {', '.join(levels)}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = levels[optimization]
        opts.log_severity_level = 3
        if profile_dir:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ModelFormatError(f"{path}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0]})") from None

    @classmethod
    def from_model(cls, description: ModelDescription, threads: int | None = None, **options: Any) -> OrtBackend:
        if "artifact" not in description.metadata:
            raise ConfigError(
                f"{description.source} is not an ONNX export; run: edgellm export onnx {description.source} -o DIR"
            )
        allowed = {k: v for k, v in options.items() if k in ("optimization", "verify", "profile_dir")}
        allowed.setdefault("verify", not description.metadata.get("verified", False))  # checked once at load
        return cls(description.config, Path(description.source), threads=threads, **allowed)

    def _open(self, layers: LayerRange, max_tokens: int) -> Session:
        return OrtSession(self, layers, max_tokens)
