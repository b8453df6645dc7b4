"""Build selkernels._C: CPU kernels always, CUDA kernels when torch and a toolkit allow.

Install after torch, without build isolation (an isolated build env would pull a second,
different torch and the extension would not load beside the runtime one):

    pip install torch && pip install --no-build-isolation .

Environment switches:
  SELKERNELS_FORCE_CUDA=1  build the CUDA sources even if the checks below say no
  SELKERNELS_FORCE_CPU=1   never build the CUDA sources
  TORCH_CUDA_ARCH_LIST     CUDA architectures; defaults to "8.0;9.0+PTX" when no GPU is visible
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:  # an isolated build env has no torch
    sys.exit("selkernels: install torch first, then build with `pip install --no-build-isolation .`")
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("SELKERNELS_FORCE_CPU"):
        return False
    if _flag("SELKERNELS_FORCE_CUDA"):
        return True
    # Decided by the toolchain, never by torch.cuda.is_available(): wheels and cluster
    # login nodes build without a GPU.
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_include_dirs():
    """Headers torch's CUDA wheel ships (cusparse.h, cublas_v2.h, ...) for minimal toolkits."""
    dirs = []
    for site in sys.path:
        for sub in (
            "nvidia/cu13/include",
            "nvidia/cuda_runtime/include",
            "nvidia/cusparse/include",
            "nvidia/cublas/include",
            "nvidia/cusolver/include",
        ):
            path = os.path.join(site, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -g0: Python's default -g makes a 12 MB .so and doubles build time. No -std: cpp_extension
    # passes the standard the installed torch's headers need (C++20 for torch >= 2.13) to g++ and nvcc.
    cxx = ["-O3", "-g0"]
    ldflags = []
    if torch.backends.openmp.is_available():
        # cpp_extension adds no OpenMP: without it at::parallel_for runs on one thread.
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    # The extension has no Python bindings (ops are reached through torch.ops), so it is built
    # against the stable ABI: one abi3 wheel serves every CPython >= 3.9.
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # cpp_extension cannot guess without a GPU (it crashes); build for the
            # architectures people train on, with PTX for newer ones.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("SELKERNELS_WITH_CUDA", None))
        include_dirs += _cuda_include_dirs()
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    return ext_cls(
        name="selkernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=ldflags,
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["selkernels", "selkernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
