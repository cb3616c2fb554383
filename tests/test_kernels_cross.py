"""edgellm's block kernels on Arm (Raspberry Pi 4 = ARMv8-A NEON, Pi 5 / Jetson Orin = ARMv8.2-A with
dotprod), cross-compiled and run under qemu-user against the same oracles as on x86: gguf-py's
dequantization (bit-exact) and the numpy int8-activation emulation (relative error < 1e-5).

The NEON paths run the same float operations in the same order as the x86 SIMD paths, so their
products must also equal this machine's library bit for bit. The whole custom-op library (ONNX Runtime
glue included) is cross-compiled too, with the flags edgellm builds with.

Needs Debian's g++-aarch64-linux-gnu and qemu-user (`make test` installs them when run as root where apt
can); skipped otherwise. qemu checks the arithmetic, not the speed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgellm.export.block_formats import interleave_x8
from edgellm.runtime import ort_kernels
from tests.block_oracles import EMULATION_RTOL, emulated, gguf_blocks, gguf_float

CXX, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
pytestmark = pytest.mark.skipif(not (CXX and QEMU), reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")
KERNELS = Path(ort_kernels.__file__).with_name("kernels")
DRIVER = Path(__file__).with_name("native") / "block_matmul_driver.cpp"
ARCHES = {"armv8-a": "neon", "armv8.2-a+dotprod": "neon-dotprod"}


def _compile(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module", params=sorted(ARCHES))
def driver(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("aarch64")
    flags = [f for f in ort_kernels._flags(request.param) if f not in ("-shared", "-fPIC", "-fvisibility=hidden")]
    out = root / f"driver-{request.param}"
    _compile([CXX, *flags, "-static", f"-I{KERNELS}", "-o", str(out), str(DRIVER), str(KERNELS / "block_matmul.cpp")])
    return out, ARCHES[request.param]


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_the_whole_library_cross_compiles(arch, tmp_path):
    _compile([CXX, *ort_kernels._flags(arch), "-o", str(tmp_path / "lib.so"),
              *(str(KERNELS / s) for s in ort_kernels.SOURCES)])


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("m, n", [(1, 45), (6, 16)])
def test_arm_paths_match_the_oracles(driver, fmt, m, n, tmp_path):
    exe, isa = driver
    k = 160
    blocks = gguf_blocks(fmt, n, k, seed=m + n)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    x[0, 32:64] = 0.0  # an all-zero activation block
    (tmp_path / "x").write_bytes(x.tobytes())
    (tmp_path / "w").write_bytes(interleave_x8(blocks, fmt).tobytes())
    files = [str(tmp_path / f) for f in ("x", "w", "y", "deq")]
    code = ort_kernels.FORMATS[fmt]
    done = subprocess.run([QEMU, str(exe), str(code), str(m), str(k), str(n), *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == isa  # the path the -march asked for, not the plain C fallback
    y = np.fromfile(tmp_path / "y", dtype=np.float32).reshape(m, n)
    deq = np.fromfile(tmp_path / "deq", dtype=np.float32).reshape(n, k)
    w = gguf_float(blocks, fmt)
    np.testing.assert_array_equal(deq, w.astype(np.float32))
    ref = emulated(x, w)
    assert np.abs(y - ref).max() <= EMULATION_RTOL * np.abs(ref).max()
    host = ort_kernels.build()
    if host.isa in ("avx512-vnni", "avx2"):  # the same operations in the same order
        np.testing.assert_array_equal(y, ort_kernels.block_matmul(x, interleave_x8(blocks, fmt), fmt, n, host))
