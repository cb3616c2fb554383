"""`edgellm bench`: edgellm beside llama.cpp on the same model, threads and prompt tokens.

Each engine runs in fresh worker processes (edgellm.bench.speed_worker), alternated engine by engine
for several rounds, so load time and peak RSS are per engine and machine noise hits both alike.
Medians are reported with ratios edgellm / llama.cpp, and JSON is tagged with machine and commit.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgellm.bench.speed_worker import RSS_STAGE_KEYS
from edgellm.errors import BenchmarkError, ConfigError

GENAI_BACKEND = "onnxruntime-genai"  # the comparison engine of `edgellm bench --genai` (edgellm.bench.genai)

METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "load_s")
# with BenchConfig.lookup > 0; lookup_baseline_tok_s: plain decoding through the same loop, in the same process
LOOKUP_METRICS = ("decode_lookup_tok_s", "lookup_tokens_per_pass", "lookup_baseline_tok_s")
RATIO_KEYS = (*METRICS, "decode_lookup_tok_s", "file_mb", "ppl")
HIGHER_IS_BETTER = {"prefill_tok_s": True, "decode_tok_s": True, "ttft_ms": False, "peak_rss_mb": False,
                    "load_s": False, "file_mb": False, "ppl": False, "decode_lookup_tok_s": True,
                    "lookup_baseline_tok_s": True}


@dataclass(frozen=True)
class BenchConfig:
    threads: int = 2
    n_prompt: int = 128
    n_decode: int = 128
    rounds: int = 3  # fresh processes per engine
    reps: int = 2  # timed runs inside each process
    ppl_tokens: int = 8192  # 0 skips perplexity
    prompt_text: str = "alice29.txt"
    lookup: int = 0  # > 0: also time prompt-lookup drafting with up to this many guesses, in its own workers

    def __post_init__(self) -> None:
        if min(self.threads, self.n_prompt, self.n_decode, self.rounds, self.reps) < 1:
            raise ConfigError("threads, n_prompt, n_decode, rounds and reps must all be >= 1")
        if self.lookup < 0:
            raise ConfigError(f"lookup must be >= 0 (0 = off), found {self.lookup}")
        from edgellm.corpus import CANTERBURY_FILES
        from edgellm.errors import unknown_name

        if self.prompt_text not in CANTERBURY_FILES:  # before minutes of loading and exporting
            raise unknown_name("prompt corpus file", self.prompt_text, CANTERBURY_FILES)
        if self.ppl_tokens < 0:
            raise ConfigError(f"ppl_tokens must be >= 0 (0 skips perplexity), found {self.ppl_tokens}")


@dataclass(frozen=True)
class Engine:
    label: str  # column name, e.g. "edgellm-ort"
    backend: str  # registry name
    model: str  # path the worker loads
    files: tuple[Path, ...]  # what is on disk for this engine

    @classmethod
    def onnx_dir(cls, label: str, backend: str, directory: Path) -> Engine:
        """An engine whose model is a directory of ONNX graph + external data (its file size is those)."""
        files = tuple(p for p in directory.iterdir() if p.is_file() and p.suffix in (".onnx", ".data"))
        return cls(label, backend, str(directory), files)


def machine_tag() -> dict:
    info = {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpu": _cpu_model(), "load_average_1m": os.getloadavg()[0]}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    from edgellm.runtime import ort_kernels

    try:  # which path edgellm's BlockMatMul took on this CPU (avx512-vnni, avx2, neon, ...)
        info["edgellm_kernel_isa"] = ort_kernels.build().isa
    except ort_kernels.KernelBuildError:
        info["edgellm_kernel_isa"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def prompt_ids(tokenizer, config: BenchConfig) -> list[int]:
    from edgellm.corpus import canterbury_path

    text = canterbury_path(config.prompt_text).read_bytes().decode("utf-8", errors="replace")
    ids = tokenizer.encode(text[min(10000, len(text) // 4):])  # past a title page (alice29: character 10000)
    if len(ids) < config.n_prompt:
        raise ConfigError(f"{config.prompt_text} gives {len(ids)} prompt tokens, fewer than --n-prompt {config.n_prompt}")
    return ids[: config.n_prompt]


def _run_worker(engine: Engine, config: BenchConfig, prompt_file: str, lookup: int = 0) -> dict:
    cmd = [sys.executable, "-m", "edgellm.bench.speed_worker", engine.backend, engine.model,
           "--threads", str(config.threads), "--prompt-ids", prompt_file, "--n-decode", str(config.n_decode),
           "--reps", str(config.reps), "--lookup", str(lookup)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchmarkError(f"{engine.label} benchmark worker failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(engines: list[Engine], tokenizer, config: BenchConfig,
              ppl_fn: Callable[[Engine], float] | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Interleaved rounds over the engines; returns the JSON-ready result."""
    ids = prompt_ids(tokenizer, config)
    busy = os.getloadavg()[0] / (os.cpu_count() or 1)
    if busy > 0.5:
        log(f"warning: load average is {busy:.1f} per core before the run; timings will be noisy")
    metrics = METRICS + (LOOKUP_METRICS if config.lookup else ())
    samples: dict[str, dict[str, list[float]]] = {e.label: {m: [] for m in metrics} for e in engines}
    same_tokens: dict[str, list[bool]] = {e.label: [] for e in engines}
    first_difference: dict[str, list[int | None]] = {e.label: [] for e in engines}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(ids, fh)
        prompt_file = fh.name
    try:
        for r in range(config.rounds):
            for engine in engines:
                out = _run_worker(engine, config, prompt_file)
                s = samples[engine.label]
                for run in out["runs"]:
                    for m in ("prefill_tok_s", "decode_tok_s", "ttft_ms"):
                        s[m].append(run[m])
                s["peak_rss_mb"].append(out["peak_rss_mb"])
                for stage in RSS_STAGE_KEYS:
                    if stage in out:
                        s.setdefault(stage, []).append(out[stage])
                s["load_s"].append(out["load_s"])
                log(f"round {r + 1}/{config.rounds} {engine.label}: decode "
                    f"{statistics.median(x['decode_tok_s'] for x in out['runs']):.1f} tok/s")
                if config.lookup and engine.backend != GENAI_BACKEND:  # own process: llama.cpp keeps all logits
                    out = _run_worker(engine, config, prompt_file, lookup=config.lookup)
                    for run in out["runs"]:
                        for m in LOOKUP_METRICS:
                            s[m].append(run[m])
                        same_tokens[engine.label].append(run["same_tokens"])
                        first_difference[engine.label].append(run["first_difference"])
                    log(f"round {r + 1}/{config.rounds} {engine.label}: decode with lookup "
                        f"{statistics.median(x['decode_lookup_tok_s'] for x in out['runs']):.1f} tok/s")
    finally:
        os.unlink(prompt_file)
    result = {"config": config.__dict__, "machine": machine_tag(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "prompt_tokens": len(ids), "engines": {}}
    for engine in engines:
        med = {m: statistics.median(v) for m, v in samples[engine.label].items() if v}  # none: not timed
        med["file_mb"] = sum(p.stat().st_size for p in engine.files) / 2**20
        med["backend"] = engine.backend
        med["model"] = engine.model
        if ppl_fn is not None and config.ppl_tokens:
            med["ppl"] = ppl_fn(engine)
        if same_tokens[engine.label]:
            med["lookup_same_tokens"] = all(same_tokens[engine.label])
            # where drafting's tokens first left the plain decode's (a near tie between pass shapes), per run
            med["lookup_first_difference"] = first_difference[engine.label]
        med["samples"] = samples[engine.label]
        result["engines"][engine.label] = med
    labels = [e.label for e in engines]
    if len(labels) >= 2:
        base = result["engines"][labels[-1]]
        result["baseline"] = labels[-1]
        for label in labels[:-1]:
            ours = result["engines"][label]
            result.setdefault("ratios", {})[f"{label}/{labels[-1]}"] = {
                m: ours[m] / base[m] for m in RATIO_KEYS if m in ours and base.get(m)
            }
    return result


def alice_perplexity(tokenizer, config: BenchConfig) -> Callable[[Engine], float]:
    """Perplexity of an engine on alice29's first config.ppl_tokens tokens, windows of 512 (baselines.md)."""

    from edgellm.corpus import canterbury_path

    ids = tokenizer.encode(canterbury_path("alice29.txt").read_bytes().decode("utf-8"))[: config.ppl_tokens]

    def ppl(engine: Engine) -> float:  # the same token ids for every engine, encoded once
        from edgellm.bench.perplexity import perplexity
        from edgellm.model.loader import load_model
        from edgellm.runtime.registry import create_backend

        if engine.backend == GENAI_BACKEND:
            from edgellm.bench import genai

            return genai.perplexity(engine.model, ids, window=512)
        backend = create_backend(engine.backend, load_model(engine.model), threads=config.threads, logits_all=True)
        return perplexity(backend, ids, window=512, progress=True).ppl

    return ppl


def write_result(result: dict, path: str | Path) -> Path:
    """The JSON result, written atomically (a reader never sees half a file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False) as fh:
        fh.write(json.dumps(result, indent=2))
    Path(fh.name).replace(out)
    return out


def add_ratios(result: dict, label: str, against: list[str]) -> None:
    """Also report `label` against each engine in `against` (e.g. a pruned export against the dense one)."""
    ours = result["engines"][label]
    for other in against:
        base = result["engines"][other]
        result.setdefault("ratios", {})[f"{label}/{other}"] = {
            m: ours[m] / base[m] for m in RATIO_KEYS if m in ours and base.get(m)}


def format_table(result: dict) -> str:
    """A markdown table: one row per metric, one column per engine, then one column per ratio."""
    labels = list(result["engines"])
    ratios = result.get("ratios", {})
    rows = ["| metric | " + " | ".join(labels) + " |" + "".join(f" {r} |" for r in ratios),
            "|---|" + "---|" * (len(labels) + len(ratios))]
    for m in ("prefill_tok_s", "decode_tok_s", *LOOKUP_METRICS, "ttft_ms", "peak_rss_mb", *RSS_STAGE_KEYS, "file_mb",
              "load_s", "ppl"):
        if not any(m in result["engines"][lb] for lb in labels):
            continue
        cells = [f"{result['engines'][lb][m]:.2f}" if m in result["engines"][lb] else "-" for lb in labels]
        extra = "".join(f" {r[m]:.2f}x |" if m in r else " |" for r in ratios.values())
        rows.append(f"| {m} | " + " | ".join(cells) + " |" + extra)
    return "\n".join(rows)
