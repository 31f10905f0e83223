"""Builds ghostkernels._C, the fused C++ CPU kernels, against the installed torch.

Install without build isolation so that the build sees the torch you run with:
    pip install --no-build-isolation -e .
"""

import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


class IncrementalBuildExt(BuildExtension.with_options(use_ninja=True)):
    """Compiles into build/temp of the source tree, whatever temporary directory pip's editable
    install gives: ninja then recompiles only what changed, so the README's second command does
    not rebuild what the first one built (about 3 minutes on 2 cores)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")

setup(
    packages=find_packages(include=["ghostkernels", "ghostkernels.*"]),
    ext_modules=[
        CppExtension(
            "ghostkernels._C",
            ["csrc/ghost_cpu.cpp", "csrc/ghost_backward_cpu.cpp", "csrc/ghost_train_cpu.cpp", "csrc/direct_conv_cpu.cpp",
             "csrc/cheap_mix_cpu.cpp", "csrc/squeeze_excite_cpu.cpp",
             "csrc/pointwise_conv_cpu.cpp", "csrc/batch_norm_cpu.cpp", "csrc/output_pool.cpp", "csrc/amx_gemm.cpp",
             "csrc/frozen_weights.cpp"],
            # at::parallel_for is an OpenMP pragma in a header: without -fopenmp it runs serially.
            # The loader reuses the libgomp.so.1 that torch ships.
            # -g0 -s: no debug information in the shipped library (it was 18 MB with it).
            # -fno-tree-loop-distribute-patterns: GCC otherwise turns the kernels' loops over short
            # runs (copy_run, halo rows, tile tails) into memcpy/memset calls, which cost more than
            # the copy on GhostNet's 1-196-element planes (1662 call sites in the library, now 441).
            extra_compile_args=["-O3", "-fopenmp", "-g0", "-fno-tree-loop-distribute-patterns"],
            extra_link_args=["-fopenmp", "-s"],
        )
    ],
    cmdclass={"build_ext": IncrementalBuildExt},
)
