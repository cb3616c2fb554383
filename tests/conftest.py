"""Shared fixtures: the real default model and its engines, loaded once per test session."""

from __future__ import annotations

import pytest

from edgellm.corpus import canterbury_path


@pytest.fixture(scope="session")
def model():
    from edgellm.model.loader import load_model

    return load_model()


@pytest.fixture(scope="session")
def tokenizer(model):
    from edgellm.model.tokenizer import Tokenizer

    return Tokenizer(model.tokenizer)


@pytest.fixture(scope="session")
def reference(model):
    from edgellm.runtime.registry import create_backend

    return create_backend("reference", model)


@pytest.fixture(scope="session")
def llamacpp(model):
    """llama.cpp through llama-cpp-python on the same GGUF, every position's logits kept."""
    from edgellm.runtime.registry import create_backend

    return create_backend("llama.cpp", model, threads=2, logits_all=True)


@pytest.fixture(scope="session")
def alice_text() -> str:
    return canterbury_path("alice29.txt").read_bytes().decode("utf-8")


@pytest.fixture(scope="session")
def alice_ids(tokenizer, alice_text) -> list[int]:
    return tokenizer.encode(alice_text)
