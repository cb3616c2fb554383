"""JSON bodies of the offload protocol as pydantic models: they validate requests (422) and document the API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ErrorBody(BaseModel):
    error: str = Field(description="short machine-readable reason")
    detail: str = Field(description="one line for humans")
    position: int | None = Field(None, description="the session's position (409 stale_position)")


class Health(BaseModel):
    status: str
    version: str


class Limits(BaseModel):
    max_sessions: int
    max_session_bytes: int
    max_total_bytes: int
    max_request_bytes: int
    idle_expiry_s: float
    max_forward_tokens: int
    max_response_bytes: int
    kv_bytes_per_token_per_layer: int


class Profile(BaseModel):
    layer_ms_decode: list[float]
    layer_ms_prefill_per_token: list[float]
    head_ms: float
    measured_at: str


class Capabilities(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_sha256: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    dtypes: list[str]
    limits: Limits
    profile: Profile | None


def request_models(n_layers: int, context_length: int, vocab_size: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(CreateSession, MoveSplit) bounded by this model's shapes, so the published schema is exact and an
    out-of-range value is a 422 before any handler runs."""

    class CreateSession(_Strict):
        model_sha256: str = Field(max_length=128, description="sha256 of the device's model file")
        start: int = Field(ge=0, le=n_layers - 1, description="first server layer: it runs [start, n_layers) + head")
        max_tokens: int = Field(ge=1, le=context_length, description="context this session may fill")

    class MoveSplit(_Strict):
        start: int = Field(ge=0, le=n_layers - 1, description="new first server layer")
        position: int = Field(ge=0, le=context_length,
                              description="tokens cached on both sides; below the current one rolls back")
        token_ids: list[Annotated[int, Field(ge=0, le=vocab_size - 1)]] | None = Field(
            None, max_length=context_length, description="the token history, to recompute joining layers' KV")

    return CreateSession, MoveSplit


class SessionInfo(BaseModel):
    session_id: str
    start: int
    stop: int
    position: int
    max_tokens: int
    idle_expiry_s: float


class DrainState(BaseModel):
    draining: bool
