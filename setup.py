"""Build the extension ued_fast._C (the project's metadata is in pyproject.toml).

The C++ CPU kernels are always built. The CUDA kernels (csrc/*.cu) are added when the installed
torch has CUDA, nvcc is found (CUDA_HOME) and either a GPU is visible or FORCE_CUDA=1 is set (the
convention of torchvision and detectron2: a build machine without a GPU, such as CI, asks for them).
FORCE_CUDA=1 without a CUDA torch or nvcc is an error, never a silent CPU-only build.
UED_FAST_NO_CUDA=1 skips the CUDA kernels; UED_FAST_NO_EXT=1 skips the extension entirely (the
reference and Triton backends still work).
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_arch_flags():
    """Flags that choose the x86 vector ISA of the C++ CPU kernels.

    ATen's Vectorized<T> picks its width at compile time from CPU_CAPABILITY, so the extension is
    compiled for one ISA. Default: x86-64-v3 (AVX2 + FMA + F16C: Intel since Haswell, AMD since
    Zen; every GPU host and CI machine of this project) with ATen's AVX2 vector code. A CPU without
    it gets a clear error at the first kernel call. Override with UED_FAST_CPU_ARCH: 'x86-64'
    (portable, scalar Vectorized, slower), 'x86-64-v4' (AVX-512, ~15% faster kd_loss on an AVX-512
    host), or 'native'. Not x86: no flags (ATen's default vector code, e.g. NEON on aarch64).
    """
    if os.name == "nt" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    arch = os.environ.get("UED_FAST_CPU_ARCH", "x86-64-v3")
    capability = {"x86-64-v3": "AVX2", "x86-64-v4": "AVX512"}.get(arch)
    if arch == "native":
        flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
            capability = "AVX512"
        elif {"avx2", "fma"} <= set(flags):
            capability = "AVX2"
    extra = [f"-march={arch}"]
    if capability:
        extra += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return extra


def _import_torch():
    """torch, or a one-line error: the extension is compiled against the torch already installed."""
    try:
        import torch
    except ImportError:
        sys.exit(
            "error: ued_fast builds its C++/CUDA extension against your installed PyTorch, and none was "
            "found: install torch first, then `pip install --no-build-isolation .` "
            "(or set UED_FAST_NO_EXT=1 for a pure-Python install)"
        )
    return torch


def _want_cuda(torch, cuda_home) -> bool:
    """Whether to compile csrc/*.cu (see the module docstring)."""
    if os.environ.get("UED_FAST_NO_CUDA") == "1":
        return False
    force = os.environ.get("FORCE_CUDA") == "1"
    if force and (torch.version.cuda is None or cuda_home is None):
        sys.exit(
            f"error: FORCE_CUDA=1 but torch {torch.__version__} has no CUDA"
            if torch.version.cuda is None
            else "error: FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)"
        )
    if torch.version.cuda is None or cuda_home is None:
        return False
    return force or torch.cuda.is_available()


def _default_cuda_home():
    """Set CUDA_HOME to /usr/local/cuda when it is unset and the nvcc on PATH has no toolkit around it.

    torch takes the folder above the first nvcc on PATH as CUDA_HOME; a wrapper script such as
    /usr/local/bin/nvcc (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) would make it /usr/local, where
    neither the CUDA headers nor libcudart are, and the link fails."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc and os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include",
                                            "cuda_runtime.h")):
        return  # torch finds this toolkit itself
    if os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _cublas_headers_on_cpath(cuda_home):
    """ATen's CUDA headers include cuBLAS; an nvcc-only toolkit lacks its headers, which torch's
    nvidia-* wheels ship: append their include folder to CPATH (searched after every -I folder,
    so the toolkit's own headers keep precedence)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return
    try:
        import nvidia
    except ImportError:
        return
    found = sorted({os.path.dirname(h) for p in nvidia.__path__
                    for h in glob.glob(os.path.join(p, "*", "include", "cublas_v2.h"))})
    if found:
        os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH")] + found))


def _extensions():
    if os.environ.get("UED_FAST_NO_EXT") == "1":
        return [], {}
    torch = _import_torch()
    _default_cuda_home()  # before cpp_extension reads it
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    cuda_home = cpp_extension.CUDA_HOME  # $CUDA_HOME, else nvcc on PATH, else /usr/local/cuda
    if cuda_home and not os.path.exists(os.path.join(cuda_home, "bin", "nvcc" + (".exe" if os.name == "nt" else ""))):
        cuda_home = None
    with_cuda = _want_cuda(torch, cuda_home)
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas"] + _cpu_arch_flags() if os.name != "nt" else ["/O2", "/std:c++20"]
    extra = {"cxx": cxx}
    print(f"ued_fast: building ued_fast._C with {'C++ and CUDA' if with_cuda else 'C++ CPU'} kernels "
          f"(torch {torch.__version__})", file=sys.stderr)
    if with_cuda:
        _cublas_headers_on_cpath(cuda_home)
        extra["cxx"].append("-DUED_FAST_WITH_CUDA")
        extra["nvcc"] = [
            "-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-DUED_FAST_WITH_CUDA",
            "--expt-relaxed-constexpr",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_80,code=sm_80",
        ]
        ext = cpp_extension.CUDAExtension(
            "ued_fast._C", cpp_sources + cu_sources, extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "ued_fast._C", cpp_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Packages, version, dependencies and the console script: pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
