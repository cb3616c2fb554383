"""ONNX Runtime CPU backend for exported artifact directories.

Each session preallocates its KV cache once (one OrtValue per layer and kind, `max_tokens` long) and
binds it as both the past input and the present output of GroupQueryAttention, which then appends
new keys/values in place: no per-token reallocation, no copy of the cache. The weights are lent to
ONNX Runtime from edgellm's own mapping of the export (edgellm.runtime.ort_weights), which keeps the
file's pages out of the resident set once ONNX Runtime has packed them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, ModelFormatError, missing_extra
from edgellm.model.artifact import read_manifest, verify_files
from edgellm.model.config import ModelConfig
from edgellm.model.description import ModelDescription
from edgellm.runtime import ort_kernels
from edgellm.runtime.backend import Backend, LayerRange, Session
from edgellm.runtime.ort_weights import SUPPORTED, MappedWeights

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("onnxruntime", "ort") from exc

log = logging.getLogger(__name__)


class OrtSession(Session):
    def __init__(self, backend: OrtBackend, layers: LayerRange, max_tokens: int) -> None:
        super().__init__(layers, max_tokens)
        self.backend = backend
        self.ort_session = backend.session_for(layers)
        cfg = backend.config
        self.binding = self.ort_session.io_binding()
        # logits is bound first so that it stays output 0 of the binding when re-bound per call
        self._decode_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, cfg.vocab_size), np.float32, "cpu", 0)
        if layers.returns_logits:
            self.binding.bind_ortvalue_output("logits", self._decode_logits)
        else:
            self.binding.bind_output("hidden_out", "cpu")
        self._cache: dict[tuple[int, str], Any] = {}
        for i in range(layers.start, layers.stop):
            shape = (1, cfg.n_kv_heads_at(i), max_tokens, cfg.head_dim)  # per layer: pruning may differ
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
                self._cache[i, kind] = buf
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)

    def _forward(self, inputs: np.ndarray, all_logits: bool) -> np.ndarray:
        if self.layers.takes_tokens:
            x = np.asarray(inputs, dtype=np.int64).reshape(-1)
            if self.backend.weights is not None:
                self.backend.weights.ensure_rows(x)  # the embedding rows it gathers, read in on first use
                # (ids were checked against the vocabulary by Session.forward)
        else:
            x = np.ascontiguousarray(inputs, dtype=np.float32)
            hidden = self.backend.config.hidden_size
            if x.ndim != 2 or x.shape[1] != hidden:
                raise ConfigError(f"hidden states must be (T, {hidden}) float32, found shape {x.shape}")
        chunk = self.backend.prefill_chunk or len(x)
        if len(x) <= chunk:
            return self._run(x, self.position, all_logits)
        # A long prompt in chunks: attention's scratch grows with chunk x context, not prompt x context
        # (1024 tokens here: peak +53 instead of +90 MB, and faster); without all_logits each call keeps one row.
        outs = [self._run(x[i:i + chunk], self.position + i, all_logits) for i in range(0, len(x), chunk)]
        return np.concatenate(outs) if all_logits or not self.layers.returns_logits else outs[-1]

    def _run(self, x: np.ndarray, position: int, all_logits: bool) -> np.ndarray:
        """One ONNX Runtime call for the rows of `x` (token ids, or hidden states) starting at `position`."""
        b = self.binding
        n = len(x)
        if self.layers.takes_tokens:
            b.bind_cpu_input("input_ids", x.reshape(1, n))
        else:
            b.bind_cpu_input("hidden_states", x.reshape(1, *x.shape))
        total = position + n
        b.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        if not self.layers.returns_logits:
            b.bind_output("hidden_out", "cpu")  # re-bound: its sequence length changes between calls
            self.ort_session.run_with_iobinding(b)
            return b.get_outputs()[0].numpy().reshape(n, -1).copy()
        keep = n if all_logits else 1
        b.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        if keep == 1:
            b.bind_ortvalue_output("logits", self._decode_logits)
        else:
            b.bind_output("logits", "cpu")
        self.ort_session.run_with_iobinding(b)
        if keep == 1:
            return self._decode_logits.numpy().reshape(1, -1).copy()
        return b.get_outputs()[0].numpy().reshape(keep, -1)

    def _truncate(self, n_tokens: int) -> None:
        pass  # GroupQueryAttention reads only the first seqlens_k + 1 cached positions

    def read_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """One layer's keys and values for the cached positions, each (position, n_kv_heads, head_dim)."""
        self._check_layer(layer)
        k, v = (self._cache[layer, kind].numpy()[0, :, : self.position].transpose(1, 0, 2).copy()
                for kind in ("key", "value"))
        return k, v

    def write_kv(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Fill one layer's cache for positions [0, len(keys)): a layer that moved here from elsewhere."""
        self._check_layer(layer)
        for kind, data in (("key", keys), ("value", values)):
            view = self._cache[layer, kind].numpy()  # shares the OrtValue's memory
            want = (view.shape[1], view.shape[3])
            if data.ndim != 3 or tuple(data.shape[1:]) != want or data.shape[0] > view.shape[2]:
                raise ConfigError(f"layer {layer} {kind}s must be (<= {view.shape[2]}, {want[0]}, {want[1]}), "
                                  f"found {tuple(data.shape)}")
            view[0, :, : data.shape[0]] = np.asarray(data, dtype=np.float32).transpose(1, 0, 2)

    def _check_layer(self, layer: int) -> None:
        if not self.layers.start <= layer < self.layers.stop:
            raise ConfigError(f"layer {layer} is not in this session's range [{self.layers.start}, {self.layers.stop})")


class OrtBackend(Backend):
    name = "onnxruntime"
    supports_layer_ranges = True  # a range runs a graph cut from the exported one (see onnx_range)

    def __init__(self, config: ModelConfig, directory: Path, threads: int | None = None,
                 optimization: str = "all", verify: bool = True, profile_dir: str | None = None,
                 lend_weights: bool = True, prefill_chunk: int = 128) -> None:
        super().__init__(config)
        manifest = read_manifest(directory)
        if manifest["backend"] != self.name:
            raise ConfigError(f"{directory} is an export for {manifest['backend']!r}, not {self.name!r}")
        if verify:
            verify_files(directory, manifest)
        if manifest.get("lowering", {}).get("offset_sums") == "drop":
            log.warning("%s is a timing ablation: its graph leaves out the Q4_1 offset correction, so its weights are "
                        "not the model's", directory)
        self.directory = directory
        self.manifest = manifest
        self.threads = threads or (os.cpu_count() or 1)
        if not isinstance(prefill_chunk, int) or prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk must be a non-negative integer (0: one call per forward), "
                              f"found {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk  # positions per ONNX Runtime call in a long forward
        self._options = (optimization, profile_dir)
        # lend_weights=False: ONNX Runtime maps the file itself (more RSS; the reference for the lent path)
        lendable = lend_weights and SUPPORTED and "initializers" in manifest["graph"]  # older exports: as before
        self.weights = MappedWeights(directory, manifest["graph"]) if lendable else None
        self.session = self._create(directory / manifest["graph"]["model"], optimization, profile_dir)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._range_sessions: dict[tuple[int, int], Any] = {}

    def session_for(self, layers: LayerRange) -> Any:
        """The ONNX Runtime session for a layer range: the exported graph, or a cut of it (kept, at most 4)."""
        if (layers.start, layers.stop) == (0, self.config.n_layers):
            return self.session
        key = (layers.start, layers.stop)
        if key not in self._range_sessions:
            import onnx

            from edgellm.runtime.onnx_range import cut_layers

            path = self.directory / self.manifest["graph"]["model"]
            whole = onnx.load(str(path), load_external_data=False)
            cut = cut_layers(whole, layers.start, layers.stop, self.config.n_layers, self.config.hidden_size)
            if len(self._range_sessions) >= 4:
                self._range_sessions.pop(next(iter(self._range_sessions)))
            kept = {t.name for t in cut.graph.initializer}
            self._range_sessions[key] = self._create(cut.SerializeToString(), *self._options, initializers=kept)
        return self._range_sessions[key]

    def _create(self, path: Path | bytes, optimization: str, profile_dir: str | None,
                initializers: set[str] | None = None) -> Any:
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
        # A memory pattern is one extra buffer per input shape seen (every prefill length): 4 MB on the
        # bench's peak RSS; decode speed the same without it (process-isolated A/B: 112.0 vs 111.6 tok/s).
        opts.enable_mem_pattern = False
        if profile_dir:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
        source: str | bytes = str(path)
        if isinstance(path, bytes):  # a cut graph: its initializers stay in the artifact's data file
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.directory))
            source = path
        if self.weights is not None and self.weights.lend(opts, initializers):
            creating = self.weights.dropping_pages()  # packed weights leave the mapping as ORT packs them
        else:
            creating = contextlib.nullcontext()
        with self._kernels(opts):  # edgellm's ops, registered until the session has created its kernels
            try:
                with creating:
                    session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                where = self.directory if isinstance(path, bytes) else path
                raise ModelFormatError(f"{where}: ONNX Runtime cannot load the graph "
                                       f"({str(exc).splitlines()[0]})") from None
        # ORT reads lent arrays in place: they must live as long as it. (Run directly, without OrtSession,
        # it would gather zeros for tokens whose embedding rows ensure_rows has not read in yet.)
        session._edgellm_weights = self.weights
        return session

    def _kernels(self, opts: Any) -> contextlib.AbstractContextManager:
        """Registers edgellm's own ops (BlockMatMul, BlockGather) for exports that use them, built on first
        use, while the returned context is held (the session's kernels copy the thread count)."""
        domains = self.manifest["graph"].get("custom_domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise ModelFormatError(f"{self.directory}: manifest graph.custom_domains must be a list of names")
        unknown = set(domains) - {ort_kernels.DOMAIN}
        if unknown:
            raise ModelFormatError(f"{self.directory}: the graph uses op domains {sorted(unknown)} that this "
                                   f"edgellm has no kernels for")
        return ort_kernels.registered(opts, self.threads) if domains else contextlib.nullcontext()

    @classmethod
    def from_model(cls, description: ModelDescription, threads: int | None = None, **options: Any) -> OrtBackend:
        if "artifact" not in description.metadata:
            raise ConfigError(
                f"{description.source} is not an ONNX export; run: edgellm export onnx {description.source} -o DIR"
            )
        allowed = {k: v for k, v in options.items() if k in ("optimization", "verify", "profile_dir", "lend_weights",
                                                                   "prefill_chunk")}
        allowed.setdefault("verify", not description.metadata.get("verified", False))  # checked once at load
        return cls(description.config, Path(description.source), threads=threads, **allowed)

    def _open(self, layers: LayerRange, max_tokens: int) -> Session:
        return OrtSession(self, layers, max_tokens)
