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


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    """The default lossless-transcode ONNX export, written once per module; never modified by a test."""
    from edgellm.export.onnx_export import export_onnx

    return export_onnx(model, tmp_path_factory.mktemp("artifact") / "smollm2")


@pytest.fixture
def copy(artifact, tmp_path):
    """A private copy of `artifact` that a test may damage."""
    import shutil
    from pathlib import Path

    return Path(shutil.copytree(artifact, tmp_path / "smollm2"))
