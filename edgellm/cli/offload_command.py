"""`edgellm generate --offload URL`: split the model between this device and a cloud server.

Kept apart from commands.py so the CLI imports httpx (and measures a device profile) only when offloading.
The bearer token comes from the EDGELLM_TOKEN environment variable (a command line is visible to others).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from typing import Any

from edgellm.cli.arg_types import bounded
from edgellm.errors import ConfigError, EdgeLLMError

TOKEN_ENV = "EDGELLM_TOKEN"


_split = bounded(int, "a layer index >= 0", low=0)
_seconds = bounded(float, "seconds > 0", low=0, low_open=True)


def add_offload_args(parser: argparse.ArgumentParser) -> None:
    """--offload URL [--offload URL2] [--objective latency|energy] [--offload-split K] ..."""
    g = parser.add_argument_group("offload (device runs layers [0, K), a cloud server the rest)")
    g.add_argument("--offload", action="append", default=[], metavar="URL",
                   help=f"edgellm serve-cloud URL; repeat for a fallback server (token from ${TOKEN_ENV})")
    g.add_argument("--objective", choices=("latency", "energy"), default="latency",
                   help="what the planner minimises per token (default latency; energy: the device's)")
    g.add_argument("--offload-split", type=_split, default=None, metavar="K",
                   help="force a static split (device layers [0, K)) instead of planning live; for comparisons")
    g.add_argument("--offload-target", default="cpu-ort", metavar="TARGET",
                   help="target whose [energy] table prices device energy (default cpu-ort)")
    g.add_argument("--offload-timeout", type=_seconds, default=10.0, metavar="S",
                   help="seconds without an answer before a server counts as failed (default 10)")


def offload_config(args: argparse.Namespace) -> Any:
    """The OffloadConfig the arguments describe."""
    from edgellm.offload.generate import OffloadConfig
    from edgellm.offload.planner import PlannerConfig

    return OffloadConfig(planner=PlannerConfig(objective=args.objective), static_split=args.offload_split,
                         timeout_s=args.offload_timeout)


def generate_offloaded(args: argparse.Namespace, model: Any, tokenizer: Any, prompt_ids: Sequence[int],
                       config: Any) -> Iterator[Any]:
    """TokenEvents of `edgellm generate` with --offload: the same stream as local generation."""
    from edgellm.offload.generate import OffloadedGenerator
    from edgellm.offload.identity import model_sha256
    from edgellm.offload.profile import energy_model
    from edgellm.runtime.registry import create_backend

    if not args.offload:
        raise ConfigError("--objective/--offload-split need --offload URL")
    name = getattr(args, "backend", None) or "reference"
    args.backend = name  # what `generate --json` reports
    if "plan" in getattr(model, "metadata", {}):
        raise ConfigError("offloading runs a model file or directory, not a compressed plan directory")
    backend = create_backend(name, model, threads=getattr(args, "threads", None))
    if not backend.supports_layer_ranges:
        raise ConfigError(f"--offload needs a backend that runs layer ranges; {name!r} runs only the whole model "
                          "(use --backend reference)")
    try:
        energy = energy_model(args.offload_target)
    except EdgeLLMError:
        if args.objective == "energy":
            raise
        energy = None  # latency planning needs no power model (e.g. an install without targets/)
    sha = model_sha256(model)
    generator = OffloadedGenerator(backend, list(args.offload), os.environ.get(TOKEN_ENV) or None,
                                   model_sha256=sha, config=offload_config(args), energy=energy,
                                   profile_label=sha[:16])
    with generator:
        yield from generator.generate(tokenizer, prompt_ids, config)
