"""`edgellm serve-cloud`: serve a model's layers to devices over HTTP (the cloud side of edgellm.offload).

Kept apart from commands.py so that the CLI imports fastapi/uvicorn only when this command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

from edgellm.cli.arg_types import bounded
from edgellm.errors import ConfigError, missing_extra

MiB = 1 << 20
TOKEN_ENV = "EDGELLM_TOKEN"


def _positive(kind: type) -> Callable[[str], Any]:
    return bounded(kind, f"a positive {kind.__name__}", low=0, low_open=True)


_port = bounded(int, "a port in 0..65535 (0 = any free port)", low=0, high=65535)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `serve-cloud` to the edgellm command line."""
    from edgellm.cli.main import MODEL_HELP

    p = subparsers.add_parser("serve-cloud", help="serve a model's layers to devices (offload cloud side, REST)")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="TCP port (default 8080; 0 = any free port)")
    p.add_argument("--token", default=None,
                   help=f"bearer token clients must send (default: ${TOKEN_ENV}; prefer the variable, a command "
                        "line is visible to other users)")
    p.add_argument("--insecure", action="store_true", help="serve without a token (trusted networks only)")
    p.add_argument("--max-sessions", type=_positive(int), default=16, help="concurrent sessions (default 16)")
    p.add_argument("--idle-expiry-s", type=_positive(float), default=300.0,
                   help="close sessions idle this long (default 300)")
    p.add_argument("--max-request-mb", type=_positive(float), default=16.0, help="request body limit (default 16)")
    p.add_argument("--max-session-mb", type=_positive(float), default=512.0,
                   help="KV memory bound per session (default 512)")
    p.add_argument("--max-total-mb", type=_positive(float), default=2048.0,
                   help="KV memory bound over all sessions (default 2048)")
    p.add_argument("--threads", type=_positive(int), default=None, help="compute threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    """Load the model, measure its per-layer profile, and serve until interrupted."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None and not args.insecure:
        raise ConfigError(f"serve-cloud needs a bearer token: pass --token T or set {TOKEN_ENV} "
                          "(or --insecure to serve without auth on a trusted network)")
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn", "serve") from None
    from edgellm.model.loader import load_model
    from edgellm.offload.identity import model_id, model_sha256
    from edgellm.offload.server import ServerSettings, create_app
    from edgellm.runtime.registry import create_backend

    settings = ServerSettings(
        token=token, insecure=token is None, max_sessions=args.max_sessions, idle_expiry_s=args.idle_expiry_s,
        max_request_bytes=int(args.max_request_mb * MiB), max_session_bytes=int(args.max_session_mb * MiB),
        max_total_bytes=int(args.max_total_mb * MiB),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("serving WITHOUT auth on %s: anyone who can reach it can use it", args.host)
    model = load_model(args.model)
    # an export runs on the backend its manifest names (ONNX Runtime sessions move KV too); a GGUF on reference
    backend = create_backend(str(model.metadata.get("backend", "reference")), model, threads=args.threads)
    app = create_app(backend, model_id(model), model_sha256(model), settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
