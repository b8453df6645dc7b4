"""CPU CUDA-semantics harness (tests/cuda_harness): build and run its tests in every mode, and
check the kernel headers with the real nvcc. No GPU and no torch needed."""

import os
import shutil
import subprocess
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "cuda_harness")
CXX = os.environ.get("CXX", "g++")

SANITIZER_FLAGS = {
    "plain": [],
    "tsan": ["-fsanitize=thread"],
    "asan": ["-fsanitize=address,undefined", "-fsanitize=bounds", "-fno-sanitize-recover=all"],
}


def _compiler_supports(flags):
    """True if CXX can build and run a trivial C++20 program with these flags."""
    if shutil.which(CXX) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as fh:
            fh.write(
                "#include <source_location>\n"
                "int main() { return std::source_location::current().line() == 2 ? 0 : 1; }\n"
            )
        build = subprocess.run([CXX, "-std=c++20", *flags, src, "-o", exe], capture_output=True)
        if build.returncode != 0:
            return False
        return subprocess.run([exe], capture_output=True).returncode == 0


def _run(cmd, timeout):
    proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", ["plain", "tsan", "asan"])
def test_harness_build_and_run(mode):
    if not _compiler_supports(SANITIZER_FLAGS[mode]):
        pytest.skip(f"{CXX} cannot build C++20 with {' '.join(SANITIZER_FLAGS[mode]) or 'no sanitizer'}")
    rc, out = _run(["bash", os.path.join(HARNESS, "build.sh"), mode], timeout=1800)
    assert rc == 0, out[-20000:]
    assert "FAIL" not in out, out[-20000:]


def test_kernel_headers_compile_with_nvcc():
    rc, out = _run(["bash", os.path.join(HARNESS, "nvcc_check.sh")], timeout=1800)
    if rc == 77:
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else "nvcc not found")
    assert rc == 0, out[-20000:]
