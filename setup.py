"""Builds the fused C++ CPU kernels against the installed torch: on x86-64 twice,
ghostkernels._C_avx512 and ghostkernels._C_avx2 (the loader takes the one the CPU runs,
csrc/isa.h says why), elsewhere once, ghostkernels._C.

Install without build isolation so that the build sees the torch you run with:
    pip install --no-build-isolation -e .
"""

import glob
import importlib.util
import os
import platform
import subprocess

from setuptools import find_packages, setup
from setuptools.errors import CompileError
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# ghostkernels/_sources.py by path: importing the package needs the build.
_spec = importlib.util.spec_from_file_location("ghostkernels_sources", os.path.join(ROOT, "ghostkernels", "_sources.py"))
SOURCES_DIGEST = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SOURCES_DIGEST)


class IncrementalBuildExt(BuildExtension.with_options(use_ninja=True)):
    """Compiles into build/temp of the source tree, whatever temporary directory pip's editable
    install gives: ninja then recompiles only what changed, so the README's second command does
    not rebuild what the first one built (about 3 minutes on 2 cores)."""

    def run(self):
        super().run()
        # Beside each library where it ends up (copied into the package by --inplace and editable
        # installs), what the loader checks in a source checkout (ghostkernels/_sources.py).
        digest = SOURCES_DIGEST.digest(os.path.join(ROOT, "csrc"))
        for ext in self.extensions:
            library = self.get_ext_fullpath(ext.name)
            if os.path.exists(library):
                with open(library + SOURCES_DIGEST.DIGEST_SUFFIX, "w") as f:
                    f.write(digest)

    def build_extensions(self):
        try:
            super().build_extensions()
        except (OSError, subprocess.CalledProcessError) as error:  # torch's ABI check runs the compiler first
            self.warn(f"the C++ kernels are not built, no working C++ compiler: {error}")
            for ext in self.extensions:
                remove_earlier_build(ext)

    def build_extension(self, ext):
        # A directory per build: the two x86-64 builds compile the same sources.
        self.build_temp = os.path.join(ROOT, "build", "temp", ext.name.rsplit(".", 1)[1])
        try:
            super().build_extension(ext)
        except RuntimeError as error:  # torch's failed ninja build, as the error that `optional` skips
            remove_earlier_build(ext)
            raise CompileError(str(error)) from error


def remove_earlier_build(ext):
    """An editable install's library (and its sources digest) from an earlier build would load as
    if this one had succeeded."""
    for path in glob.glob(os.path.join(ROOT, *ext.name.split(".")) + ".*"):
        os.remove(path)


SOURCES = ["csrc/ghost_cpu.cpp", "csrc/ghost_backward_cpu.cpp", "csrc/ghost_train_cpu.cpp", "csrc/direct_conv_cpu.cpp",
           "csrc/cheap_mix_cpu.cpp", "csrc/squeeze_excite_cpu.cpp", "csrc/pointwise_conv_cpu.cpp",
           "csrc/batch_norm_cpu.cpp", "csrc/dfc_attention_cpu.cpp", "csrc/output_pool.cpp", "csrc/bf16_gemm.cpp",
           "csrc/frozen_weights.cpp", "csrc/registration.cpp"]
# The instruction sets of -march=x86-64-v3 and -v4, spelled out: GCC 12 builds the same objects from
# either, and GCC < 11 and clang < 12 (RHEL 8's GCC 8, say), which lack those names, build too.
X86_64_V3 = ["-mcx16", "-msahf", "-mpopcnt", "-msse3", "-msse4.1", "-msse4.2", "-mssse3", "-mavx", "-mavx2", "-mbmi",
             "-mbmi2", "-mf16c", "-mfma", "-mlzcnt", "-mmovbe", "-mxsave"]
X86_64_V4 = X86_64_V3 + ["-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl"]
# (module suffix, compiler flags): the instruction set and the vector width of csrc/isa.h.
if platform.machine().lower() in ("x86_64", "amd64"):
    BUILDS = [("_C_avx512", [*X86_64_V4, "-DGK_VECTOR_BYTES=64"]),
              ("_C_avx2", [*X86_64_V3, "-DGK_VECTOR_BYTES=32"])]
else:
    BUILDS = [("_C", ["-DGK_VECTOR_BYTES=16"])]

setup(
    packages=find_packages(include=["ghostkernels", "ghostkernels.*"]),
    ext_modules=[
        CppExtension(
            f"ghostkernels.{name}",
            SOURCES,
            # A machine that cannot compile it (no C++ compiler, no OpenMP) still installs the
            # package: its ops run the PyTorch reference on the CPU (Triton on a GPU), and the first
            # call says so once; ghostkernels.backends() names the missing build.
            optional=True,
            # at::parallel_for is an OpenMP pragma in a header: without -fopenmp it runs serially.
            # The loader reuses the libgomp.so.1 that torch ships.
            # -g0 -s: no debug information in the shipped library (it was 18 MB with it).
            # -fno-tree-loop-distribute-patterns: GCC otherwise turns the kernels' loops over short
            # runs (copy_run, halo rows, tile tails) into memcpy/memset calls, which cost more than
            # the copy on GhostNet's 1-196-element planes (1662 call sites in the library, now 441).
            # The sources include the per-operator headers they use (<ATen/ops/conv2d.h>), not
            # <ATen/ATen.h>, which took ~10 s of each file's compile, half of the build; with these
            # two macros (as PyTorch builds itself) an #include of ATen.h fails to compile.
            extra_compile_args=["-O3", "-fopenmp", "-g0", "-fno-tree-loop-distribute-patterns",
                                "-DAT_PER_OPERATOR_HEADERS", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS", *isa_flags],
            extra_link_args=["-fopenmp", "-s"],
        )
        for name, isa_flags in BUILDS
    ],
    cmdclass={"build_ext": IncrementalBuildExt},
)
