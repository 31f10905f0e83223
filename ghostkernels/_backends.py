"""Which kernel serves each device, and why: the compiled CPU library is loaded tolerantly."""

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re

import torch

from . import _sources

_cpu_status = None


# The C++ builds (setup.py): an x86-64 install has one per instruction set, with the vector width
# of that set (csrc/isa.h); elsewhere there is one.
_X86_BUILDS = {"AVX512": "_C_avx512", "AVX2": "_C_avx2"}


def _cpu_build():
    """(module name, None) of the C++ build this CPU runs, or (None, why there is none). torch's
    CPU capability decides, so ATEN_CPU_CAPABILITY=avx2 also selects the AVX2 build on an
    AVX-512 CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "_C", None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _X86_BUILDS:
        return None, f"the C++ kernels need AVX2 or AVX-512; torch reports this CPU as {capability}"
    return _X86_BUILDS[capability], None


def cpu_library():
    """(module name, file) of the C++ build this CPU runs, or (None, why there is none)."""
    name, why_not = _cpu_build()
    if name is None:
        return None, why_not
    spec = importlib.util.find_spec(f"ghostkernels.{name}")
    if spec is None or spec.origin is None:
        return None, (f"ghostkernels.{name}, the C++ build for this CPU, is not built; "
                      "`pip install -v --no-build-isolation -e .` builds it and shows the compiler's errors")
    return name, spec.origin


def load_cpu_extension():
    """Load the C++ CPU kernels once and record why they are or are not in use.

    The warning comes at the first call that falls back (ops._warn_fallback), not at import.
    """
    global _cpu_status
    if _cpu_status is not None:
        return _cpu_status
    if os.environ.get("GHOSTKERNELS_DISABLE_CPP") == "1":
        _cpu_status = ("reference", "the C++ extension is disabled by GHOSTKERNELS_DISABLE_CPP=1")
        return _cpu_status
    name, library = cpu_library()
    if name is None:
        _cpu_status = ("reference", library)
    elif (stale := _sources.stale_reason(library)) is not None:
        _cpu_status = ("reference", f"the C++ extension is not loaded: {stale}")
    else:
        try:
            torch.ops.load_library(library)
            _cpu_status = ("cpp", f"fused C++ kernels ({name[3:] or 'generic'} build) from {library}")
        except (OSError, RuntimeError) as error:
            _cpu_status = ("reference", f"the C++ extension failed to load: {error}")
    return _cpu_status


_triton = None  # (reason, {module name: module}) or (reason, None) once an import failed

# The oldest Triton the kernels are written and tested for (torch 2.6 to 2.9 pin Triton 3.2 to 3.5;
# torch 2.10 and 2.11 pin 3.6).
MIN_TRITON = (3, 6)


def _triton_too_old(version):
    """Why Triton `version` (a version string) cannot run the kernels, or None if it can."""
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= MIN_TRITON:
        return None
    return f"Triton {version} is older than 3.6, which the kernels need; install triton>=3.6"


def _installed_triton_version():
    for distribution in ("triton", "pytorch-triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return None


def triton_kernels(name="triton_ghost"):
    """A Triton kernels module of this package (triton_ghost, triton_cheap_mix), imported on
    first use; None (and the reason kept) if Triton cannot be imported or is too old."""
    global _triton
    if _triton is None or (_triton[1] is not None and name not in _triton[1]):
        try:
            import triton
            too_old = _triton_too_old(triton.__version__)
            if too_old:
                _triton = (too_old, None)
            else:
                modules = dict(_triton[1]) if _triton is not None else {}
                modules[name] = importlib.import_module(f".{name}", __package__)
                _triton = (f"Triton {triton.__version__} kernels", modules)
        except ImportError as error:
            _triton = (f"Triton cannot be imported ({error}); install triton>=3.6", None)
    return _triton[1][name] if _triton[1] is not None else None


# Read once, at import: a per-call environment read costs 1-3 us.
_TF32_ALLOWED = os.environ.get("GHOSTKERNELS_TF32", "1") == "1"


def tf32_float32_dots():
    """Whether the Triton kernels' float32 dots run TF32: where PyTorch's convolutions (the layers
    the Ghost op replaces) may, unless GHOSTKERNELS_TF32=0. That is torch.backends.cudnn.allow_tf32
    (default True); from torch 2.9 on, cuDNN convolutions' fp32_precision, where "none" defers to
    cuDNN's, then the global one (all "none": IEEE), and which the legacy flag sets (its getter
    raises once the two APIs disagree)."""
    if not _TF32_ALLOWED:
        return False
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:
        return torch.backends.cudnn.allow_tf32
    for precision in (conv.fp32_precision, getattr(torch.backends.cudnn, "fp32_precision", "none"),
                      getattr(torch.backends, "fp32_precision", "none")):
        if precision != "none":
            return precision == "tf32"
    return False


def _float32_dots_status():
    if not _TF32_ALLOWED:
        return "IEEE: GHOSTKERNELS_TF32=0"
    if tf32_float32_dots():
        return ("TF32, as PyTorch's float32 convolutions (torch.backends.cudnn.allow_tf32, or "
                "cudnn.conv.fp32_precision); IEEE when that is off, or with GHOSTKERNELS_TF32=0")
    return "IEEE, as PyTorch's float32 convolutions (TF32 off for cuDNN)"


def _cuda_status():
    if _triton is not None:
        reason, modules = _triton
        backend = "triton" if modules is not None else "reference"
    elif importlib.util.find_spec("triton") is None:
        backend, reason = "reference", "Triton is not installed; install triton>=3.6"
    else:
        version = _installed_triton_version()  # its package's metadata: `import triton` takes ~0.2 s
        too_old = version and _triton_too_old(version)
        backend, reason = (("reference", too_old) if too_old
                           else ("triton", "Triton kernels (imported at the first CUDA call)"))
    if not torch.cuda.is_available():
        reason += "; no CUDA device is visible"
    return {"backend": backend, "reason": reason, "float32_dots": _float32_dots_status()}


def empty_cache():
    """Free the memory the C++ kernels keep to reuse for their outputs (csrc/output_pool.h);
    returns the bytes freed. GHOSTKERNELS_OUTPUT_CACHE_MB caps it (default 1024, 0: off)."""
    if load_cpu_extension()[0] != "cpp":
        return 0
    return torch.ops.ghostkernels.empty_output_cache()


def bf16_matmuls_requested():
    """Whether the user asks for bfloat16 float32 matmuls on the CPU (the bfloat16 mode), as
    csrc/bf16_gemm.cpp and PyTorch read it: torch.set_float32_matmul_precision("medium"), or
    from torch 2.9 on torch.backends.mkldnn.matmul.fp32_precision = "bf16" (directly or through
    the mkldnn-wide or global setting). Once that API is used, the legacy getter raises."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None:
        return torch.get_float32_matmul_precision() == "medium"
    return matmul.fp32_precision == "bf16"


@contextlib.contextmanager
def ieee_float32_matmuls():
    """float32 matmuls (CPU and CUDA) in float32 inside: no bfloat16, no TF32. The user's settings
    are restored after: the legacy one, unless torch 2.9's fp32_precision API has made it disagree
    (its getter then raises), and the fp32_precision API's, which setting the legacy one changes."""
    settings = (torch.backends.mkldnn.matmul, torch.backends.cuda.matmul) if hasattr(torch.backends.mkldnn, "matmul") \
        else ()
    saved = [setting.fp32_precision for setting in settings]
    try:
        legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    except RuntimeError:
        legacy = None
    for setting in settings:
        setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for setting, precision in zip(settings, saved):
            setting.fp32_precision = precision


def _bfloat16_matmul_status(cpu_backend):
    """Whether the C++ kernels' float32 GEMMs run bfloat16 now, on what, and why (csrc/bf16_gemm.h)."""
    if cpu_backend != "cpp":
        return "off: the C++ kernels are not in use"
    available, engine = torch.ops.ghostkernels.bf16_gemm_status()
    if not available:
        return f"unavailable: {engine}"
    if bf16_matmuls_requested():
        return (f"on: float32 GEMMs of the fused forward kernels run bfloat16 on {engine} "
                "(torch.get_float32_matmul_precision() is 'medium', or mkldnn matmuls' fp32_precision 'bf16')")
    return f"off: {engine} available; torch.set_float32_matmul_precision('medium') turns it on"


def backends():
    """{device type: {"backend": name, "reason": why}} for every device type ghostkernels knows;
    the CPU entry also gives "cached_bytes", the memory held for reuse as outputs, and
    "bfloat16_matmul", whether its float32 GEMMs run bfloat16, on what, and why; the CUDA entry
    "float32_dots", whether the Triton kernels' float32 dots run TF32 and why."""
    cpu_backend, cpu_reason = load_cpu_extension()
    cached = torch.ops.ghostkernels.output_cache_bytes() if cpu_backend == "cpp" else 0
    return {"cpu": {"backend": cpu_backend, "reason": cpu_reason, "cached_bytes": cached,
                    "bfloat16_matmul": _bfloat16_matmul_status(cpu_backend)}, "cuda": _cuda_status()}
