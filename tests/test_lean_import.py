"""`import edgellm` (and the model/CLI layers) must not drag in heavy engines."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "tvm", "pynq", "llama_cpp", "transformers")


def test_import_edgellm_is_lean():
    code = (
        "import sys, edgellm, edgellm.model, edgellm.model.loader, edgellm.model.tokenizer, edgellm.runtime, "
        "edgellm.runtime.generation, edgellm.bench.perplexity, edgellm.cli.main\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"imported at package import time: {out}"


def test_loading_a_model_does_not_import_torch():
    code = ("import sys; from edgellm.model.loader import load_model; m = load_model(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
