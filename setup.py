"""Build ued_fast and its extension ued_fast._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/*.cu) are added when the installed
torch has CUDA and nvcc is found; set UED_FAST_NO_CUDA=1 to skip them, or UED_FAST_NO_EXT=1 to
skip the extension entirely (the reference and Triton backends still work).
"""
import glob
import os
import platform

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


def _extensions():
    if os.environ.get("UED_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("UED_FAST_NO_CUDA") != "1"
    )
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas"] + _cpu_arch_flags() if os.name != "nt" else ["/O2", "/std:c++20"]
    extra = {"cxx": cxx}
    if with_cuda:
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

setup(
    name="ued_fast",
    version="0.1.0",
    description="Knowledge distillation from a Unified Ensemble of Specialized Teachers (USTE), with fused KD ops",
    python_requires=">=3.10",
    # kernels/ (Triton) lives at the top of the repo, as the design card fixes, and installs as ued_fast.kernels.
    packages=["ued_fast", "ued_fast.ops", "ued_fast.kernels"],
    package_dir={"ued_fast": "ued_fast", "ued_fast.ops": "ued_fast/ops", "ued_fast.kernels": "kernels"},
    package_data={"ued_fast": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["numpy", "pyyaml", "typer", "tqdm", "matplotlib", "safetensors"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "pillow", "scipy", "expecttest"],
        "data": ["scikit-learn", "pillow", "scipy"],
    },
    entry_points={"console_scripts": ["ued-fast=ued_fast.cli:main"]},
)
