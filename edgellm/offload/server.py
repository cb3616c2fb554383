"""The cloud half of the offloader: a FastAPI app serving PROTOCOL.md over an edgellm Backend.

    request -> BodyLimit (413 before the body is read in full) -> auth (401) -> draining? (503)
            -> OffloadService in a worker thread (per-session lock) -> tensor or JSON answer

Compute runs in the threadpool so one long prefill does not stall other sessions' requests; every
refusal is JSON {"error", "detail"} with a documented 4xx (a 5xx other than 503 is a bug).
"""

# No `from __future__ import annotations`: the routes are built inside create_app with request models bounded
# by the model's shapes, and FastAPI must see those local classes as objects, not as strings.
import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm import __version__
from edgellm.errors import ConfigError, ContextOverflowError
from edgellm.offload import wire
from edgellm.offload.api_models import (
    Capabilities,
    DrainState,
    ErrorBody,
    Health,
    SessionInfo,
    request_models,
)
from edgellm.offload.server_profile import ServerProfile, measure_server_profile
from edgellm.offload.service import OffloadService
from edgellm.offload.session_store import ApiError, SessionStore
from edgellm.runtime.backend import Backend

log = logging.getLogger(__name__)
MiB = 1 << 20
SERVER_MS_HEADER = "X-Edgellm-Server-Ms"
T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of one server; token None is allowed only with insecure=True."""

    token: str | None = None
    insecure: bool = False
    max_sessions: int = 16
    max_session_bytes: int = 512 * MiB
    max_total_bytes: int = 2048 * MiB
    idle_expiry_s: float = 300.0
    max_request_bytes: int = 16 * MiB
    max_forward_tokens: int = 2048  # positions per forward step (bounds attention scratch memory)
    max_response_bytes: int = 64 * MiB  # all-position logits of one step
    sweep_interval_s: float = 10.0
    retry_after_s: int = 5
    profile: bool = True  # measure per-layer timings at start-up (tests that do not need them turn it off)

    def __post_init__(self) -> None:
        if not self.token and not self.insecure:
            raise ConfigError("the server needs a bearer token (or insecure=True to run without one)")
        for name in ("max_sessions", "max_session_bytes", "max_total_bytes", "idle_expiry_s", "max_request_bytes",
                     "max_forward_tokens", "max_response_bytes", "sweep_interval_s", "retry_after_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"server setting {name} must be > 0, found {getattr(self, name)}")


# -- OpenAPI descriptions of what every route may answer ----------------------------------------------------------
_BINARY = {"schema": {"type": "string", "format": "binary"}}
TENSOR_REQUEST = {"requestBody": {"required": True, "content": {wire.CONTENT_TYPE: _BINARY}}}
_REASONS = {
    400: "malformed payload or parameters", 401: "missing or wrong bearer token", 404: "unknown session",
    409: "stale position, model mismatch, or KV missing/empty", 410: "session expired", 413: "request too large",
    415: "wrong content type", 422: "JSON schema violation", 429: "too many sessions",
    503: "draining or preempted (Retry-After)", 507: "memory bound reached",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": _REASONS[c]} for c in (413, 422, *codes)}


def _tensor_ok(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {wire.CONTENT_TYPE: _BINARY}}}


_SESSION_ID = {"session_id": "$response.body#/session_id"}
SESSION_LINKS = {  # OpenAPI links: what a created session's id feeds (clients and fuzzers follow them)
    "Forward": {"operationId": "forward", "parameters": {**_SESSION_ID, "position": "$response.body#/position"}},
    "MoveSplit": {"operationId": "move_split", "parameters": _SESSION_ID},
    "UploadKV": {"operationId": "upload_kv", "parameters": _SESSION_ID},
    "DownloadKV": {"operationId": "download_kv", "parameters": _SESSION_ID},
    "DeleteSession": {"operationId": "delete_session", "parameters": _SESSION_ID},
}


# -- plumbing -----------------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


class BodyLimit:
    """Raw ASGI middleware: 413 on a Content-Length over the limit, or once a streamed body passes it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_json(send, 400, "bad_request", "Content-Length is not a non-negative integer")
            if int(length) > self.max_bytes:
                return await _send_json(send, 413, "too_large", f"body of {int(length)} bytes exceeds the "
                                        f"limit of {self.max_bytes}")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _send_json(send, 413, "too_large", f"streamed body passed the limit of "
                                        f"{self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


async def _send_json(send: Callable, status: int, code: str, detail: str) -> None:
    data = json.dumps({"error": code, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token> (PROTOCOL.md)")


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Constant-time bearer check; 401 with WWW-Authenticate on a missing or wrong token."""
    expected = request.app.state.settings.token
    if expected is None:
        return
    supplied = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def refuse_when_draining(request: Request) -> None:
    if request.app.state.draining:
        seconds = request.app.state.settings.retry_after_s
        raise ApiError(503, "draining", "the server is draining (preempted); move this work elsewhere",
                       headers={"Retry-After": str(seconds)})


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run service code in the threadpool; library errors become 400s."""
    try:
        return await run_in_threadpool(fn, *args)
    except wire.PayloadError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    except ContextOverflowError as exc:
        raise ApiError(400, "context_overflow", str(exc)) from None
    except ConfigError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def _require_tensor_body(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != wire.CONTENT_TYPE:
        raise ApiError(415, "unsupported_media_type", f"body must be {wire.CONTENT_TYPE}, found {media or 'none'!r}")


def _allowed_methods(app: FastAPI, path: str) -> str:
    """Every method the published API serves at this path (Starlette's 405 lists only one route's)."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = {"error": exc.code, "detail": _one_line(exc.detail), **exc.extra}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse({"error": "invalid_request", "detail": _one_line(f"{where}: {first['msg']}{more}")},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette lists only the first matching route's methods
            headers["Allow"] = _allowed_methods(app, request.url.path)
        return JSONResponse({"error": code, "detail": _one_line(exc.detail)}, status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": "internal", "detail": "internal server error (a bug); see the server log"},
                            status_code=500)


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(backend: Backend, model_id: str, model_sha256: str, settings: ServerSettings) -> FastAPI:
    """A FastAPI app serving layers [start, n_layers) + head of `backend` for remote sessions."""
    if not backend.supports_layer_ranges:
        raise ConfigError(f"backend {backend.name!r} cannot run a range of layers; the server needs one that can")
    dtype = getattr(getattr(backend, "model", None), "dtype", None)
    store = SessionStore(settings.max_sessions, settings.max_session_bytes, settings.max_total_bytes,
                         settings.idle_expiry_s)
    service = OffloadService(backend, model_sha256, store, kv_itemsize=getattr(dtype, "itemsize", 4),
                             max_forward_tokens=settings.max_forward_tokens,
                             max_response_bytes=settings.max_response_bytes)
    profile = measure_server_profile(backend) if settings.profile else None

    app = FastAPI(title="edgellm cloud offload", version=__version__, lifespan=_sweeping(store, settings),
                  description="Protocol v1: see edgellm/offload/PROTOCOL.md")
    app.state.settings, app.state.service, app.state.draining = settings, service, False
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.include_router(_service_router(service, settings, model_id, profile))
    app.include_router(_session_router(service))
    return app


def _sweeping(store: SessionStore, settings: ServerSettings) -> Callable[[FastAPI], Any]:
    """Lifespan: a background task expiring idle sessions (requests also sweep, lazily)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(settings.sweep_interval_s)
                if expired := store.sweep():
                    log.info("expired %d idle session(s)", expired)

        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan


def _service_router(service: OffloadService, settings: ServerSettings, model_id: str,
                    profile: ServerProfile | None) -> APIRouter:
    """Health (no auth), capabilities and the drain switch."""
    router = APIRouter(prefix="/v1")
    cfg, auth = service.config, [Depends(require_token)]

    @router.get("/health", operation_id="health", response_model=Health, responses=_errors(503))
    def health(request: Request) -> dict:
        refuse_when_draining(request)
        return {"status": "ok", "version": __version__}

    @router.get("/capabilities", operation_id="capabilities", response_model=Capabilities, dependencies=auth,
                responses=_errors(401))
    def capabilities() -> dict:
        shapes = ("n_layers", "hidden_size", "vocab_size", "n_kv_heads", "head_dim", "context_length")
        limits = ("max_sessions", "max_session_bytes", "max_total_bytes", "max_request_bytes", "idle_expiry_s",
                  "max_forward_tokens", "max_response_bytes")
        return {
            "model_id": model_id, "model_sha256": service.model_sha256,
            **{key: int(getattr(cfg, key)) for key in shapes}, "dtypes": list(wire.FLOAT_DTYPES),
            "limits": {**{key: getattr(settings, key) for key in limits},
                       "kv_bytes_per_token_per_layer": service.kv_bytes(1, 1)},
            "profile": profile.as_dict() if profile else None,
        }

    @router.post("/admin/drain", operation_id="drain", response_model=DrainState, dependencies=auth,
                 responses=_errors(401))
    def drain(request: Request) -> dict:
        request.app.state.draining = True
        log.warning("draining: new work is refused with 503")
        return {"draining": True}

    return router


def _session_router(service: OffloadService) -> APIRouter:
    """Sessions: create, forward, move the split, KV up/down, delete. Bounds come from the served model."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
    cfg = service.config
    n_layers, context, vocab = int(cfg.n_layers), int(cfg.context_length), int(cfg.vocab_size)  # GGUF: numpy ints
    CreateSession, MoveSplit = request_models(n_layers, context, vocab)
    open_only = [Depends(refuse_when_draining)]

    def session_id_path():  # a fresh FieldInfo per parameter: FastAPI must not share one between two
        return Path(max_length=64, description="id from POST /v1/sessions")

    def layer_query():
        return Query(ge=0, le=n_layers, description="layer index (start inclusive, stop exclusive)")

    @router.post("/sessions", operation_id="create_session", status_code=201, response_model=SessionInfo,
                 responses={201: {"description": "session opened", "links": SESSION_LINKS},
                            **_errors(400, 401, 409, 429, 503, 507)}, dependencies=open_only)
    async def create_session(req: CreateSession) -> dict:
        return await _in_thread(service.create, req.model_sha256, req.start, req.max_tokens)

    @router.post("/sessions/{session_id}/forward", operation_id="forward", response_class=Response,
                 openapi_extra=TENSOR_REQUEST, dependencies=open_only,
                 responses={**_tensor_ok("float32 logits (1 or T, vocab) or int32 (1,) token"),
                            **_errors(400, 401, 404, 409, 410, 415, 503)})
    async def forward(request: Request, session_id: str = session_id_path(),
                      position: int = Query(ge=0, le=context, description="tokens the session holds (stale: 409)"),
                      output: Literal["logits", "hidden", "token"] = "logits",
                      all_logits: bool = Query(False, alias="all", description="logits of every new position"),
                      ) -> Response:
        _require_tensor_body(request)
        result = await _in_thread(service.forward, session_id, position, await request.body(), output, all_logits)
        return Response(result.payload, media_type=wire.CONTENT_TYPE,
                        headers={SERVER_MS_HEADER: f"{result.compute_ms:.3f}"})

    @router.patch("/sessions/{session_id}", operation_id="move_split", response_model=SessionInfo,
                  responses=_errors(400, 401, 404, 409, 410, 503, 507), dependencies=open_only)
    async def move_split(req: MoveSplit, session_id: str = session_id_path()) -> dict:
        return await _in_thread(service.move, session_id, req.start, req.position, req.token_ids)

    @router.put("/sessions/{session_id}/kv", operation_id="upload_kv", status_code=204, response_class=Response,
                openapi_extra=TENSOR_REQUEST, dependencies=open_only,
                responses={204: {"description": "KV staged for the next PATCH"},
                           **_errors(400, 401, 404, 410, 415, 503, 507)})
    async def upload_kv(request: Request, session_id: str = session_id_path(), start: int = layer_query(),
                        stop: int = layer_query()) -> Response:
        _require_tensor_body(request)
        await _in_thread(service.put_kv, session_id, start, stop, await request.body())
        return Response(status_code=204)

    @router.get("/sessions/{session_id}/kv", operation_id="download_kv", response_class=Response,
                responses={**_tensor_ok("ELTS: K then V per layer, float32 (position, n_kv_heads, head_dim)"),
                           **_errors(400, 401, 404, 409, 410)})
    async def download_kv(session_id: str = session_id_path(), start: int = layer_query(),
                          stop: int = layer_query()) -> Response:
        payload = await _in_thread(service.get_kv, session_id, start, stop)
        return Response(payload, media_type=wire.CONTENT_TYPE)

    @router.delete("/sessions/{session_id}", operation_id="delete_session", status_code=204,
                   response_class=Response, responses={204: {"description": "session closed"},
                                                       **_errors(401, 404, 410)})
    async def delete_session(session_id: str = session_id_path()) -> Response:
        await _in_thread(service.delete, session_id)
        return Response(status_code=204)

    return router
