"""An accelerated GhostNet through the ops' CUDA kernels (their Python entries: the checks, the
routes, the plans and the Triton launches) on CPU tensors, in Triton's interpreter: the CUDA
kernels are registered as the CPU ones for the test's duration. The per-op Triton tests do not see
how the entries meet in a model (layouts handed from op to op, the route each shape takes); this
found a 1 x 1 plane of more than 32 channels in NCHW recursing forever in triton_ghost.forward."""

import contextlib
import warnings

import pytest
import torch

import ghostkernels
from ghostkernels import (cheap_mix, dfc_attention, direct_conv, ghost_depthwise, ghost_residual, ghost_train, ops,
                          squeeze_excite, triton_ghost)

from conftest import randomise_bn
from timm_ghostnet import timm_ghostnet

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs these entries itself (tests/test_triton.py)")

CUDA_ENTRIES = {
    "ghost_module": ops._ghost_module_cuda, "ghost_module_gated": ops._ghost_module_gated_cuda,
    "ghost_module_backward": ops._ghost_module_backward_cuda, "ghost_module_depthwise": ghost_depthwise._cuda,
    "ghost_module_residual": ghost_residual._ghost_residual_cuda, "ghost_module_scaled": squeeze_excite._scaled_cuda,
    "squeeze_excite_gate": squeeze_excite._gate_cuda, "direct_conv2d": direct_conv._cuda,
    "cheap_mix": cheap_mix._cuda, "cheap_mix_into": cheap_mix._cuda_into,
    "ghost_module_train": ghost_train._cuda, "ghost_module_train_backward": ghost_train._backward_cuda,
    "dfc_logits": dfc_attention._fallback}  # no CUDA kernel: its composition


@contextlib.contextmanager
def cuda_entries():
    library = torch.library.Library("ghostkernels", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": the point
        for name, entry in CUDA_ENTRIES.items():
            library.impl(name, entry, "CPU")
    try:
        yield
    finally:
        library._destroy()  # the C++ kernels again


@pytest.fixture
def cuda_entries_on_cpu():
    with cuda_entries():
        yield


@pytest.fixture
def large_ghost_blocks(monkeypatch):
    """The Ghost forward's heuristic config with larger blocks (256 pixels, 64 channels, 128-wide
    dot steps), for the whole models: the interpreter's cost is per program and per op, and they
    took 28-60 s each with the GPU's blocks (v1-32-nchw: 28.9 s, 10.5 s with these). The route each
    shape takes (kernel or library primary) is the heuristic's; the kernels at the heuristic's own
    blocks, GhostNet's shapes included, are tests/test_triton.py's and the install check's below."""
    heuristic = triton_ghost.heuristic_config

    def larger(inp, ghosts, dtype, library_ok, large=True):
        config = heuristic(inp, ghosts, dtype, library_ok, large)
        if dtype == torch.float64:  # the FMA path's [pixels, k, channels] products: kept small
            return config
        return dict(config, block_p=256, block_c=64, block_k=128)

    monkeypatch.setattr(triton_ghost, "heuristic_config", larger)
    triton_ghost._chosen_configs.clear()  # the shapes' configs, chosen at their first call
    yield
    triton_ghost._chosen_configs.clear()


@pytest.fixture
def half_precision_reaches_the_ops(monkeypatch):
    """The GPU's dtypes go to the ops (on the CPU they would run the references before them)."""
    monkeypatch.setattr(ops, "CPU_KERNEL_DTYPES", (torch.float16, torch.bfloat16, torch.float32, torch.float64))


@pytest.mark.parametrize("version, size, channels_last", [("v1", 32, False), ("v1", 32, True), ("v2", 64, True)],
                         ids=["v1-32-nchw", "v1-32-cl", "v2-64-cl"])
def test_accelerated_ghostnet_through_the_cuda_entries(large_ghost_blocks, version, size, channels_last):
    """timm's structure at width 0.5, eval, float32: the stem and depthwise convs (Triton for
    channels_last), the Ghost ops on both routes, ghost1 with the stride-2 conv, SE and ghost2 with
    the residual add, GhostNetV2's gated op. (A training step runs ~5 minutes in the interpreter;
    its Triton kernels have tests of their own in tests/test_train.py.) Accelerated, self-checked,
    on the C++ kernels first: the residual adds are fused only where the check runs."""
    model = randomise_bn(timm_ghostnet(version, width=0.5), spread=0.2).eval()
    x = torch.randn(1, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fast = ghostkernels.accelerate(model)
    assert len(fast.acceleration_summary.residual) == 16
    with torch.no_grad(), cuda_entries():
        expected = model(x)
        out = fast(x)
    err = ((out - expected).abs().max() / expected.abs().max()).item()
    assert err <= 1e-5, f"relative error {err:.3g}"


@pytest.mark.parametrize("version, size, batch, dtype",
                         [("v1", 32, 2, torch.float16), ("v2", 64, 1, torch.bfloat16)],
                         ids=["v1-32-float16", "v2-64-bfloat16"])
def test_half_precision_through_the_cuda_entries(large_ghost_blocks, half_precision_reaches_the_ops, version, size,
                                                 batch, dtype):
    """The GPU's dtypes through the same entries (2-byte elements: other channel alignments and
    vector widths than float32's), channels_last: the logits as far from float32 as eager's in
    that dtype (the original model cast to it), within a factor 2. Two images in one case (the SE
    gates per image), one in the other (the interpreter takes a minute per GhostNetV2 image).
    bfloat16 without the residual adds in ghost2's op (accelerated unchecked): Triton's interpreter
    casts float32 to bfloat16 toward zero (numpy has no bfloat16), where eager and a GPU round to
    nearest, and along the residual stream's 16 adds that bias doubles the logits' error (2.0-2.2x
    eager's over 3 seeds; 1.1x without those adds), which says nothing of the kernels. The float16
    case has them (its casts round to nearest in the interpreter too)."""
    model = randomise_bn(timm_ghostnet(version, width=0.5), spread=0.2).eval()
    x = torch.randn(batch, 3, size, size)
    half = x.to(dtype).contiguous(memory_format=torch.channels_last)
    fast = ghostkernels.accelerate(model, check=dtype is torch.float16).to(dtype)  # checked on the C++ kernels
    assert len(fast.acceleration_summary.residual) == (16 if dtype is torch.float16 else 0)
    with torch.no_grad(), cuda_entries():
        expected = model(x)
        out = fast(half).float()
        eager = model.to(dtype)(half).float()

    def error(found):
        return ((found - expected).norm() / expected.norm()).item()

    assert error(out) <= 2 * error(eager), f"fused {error(out):.3g}, eager {dtype} {error(eager):.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_install_check_through_the_cuda_entries(cuda_entries_on_cpu, half_precision_reaches_the_ops, dtype):
    """`python -m ghostkernels`' GPU part (its shapes, in float16 and bfloat16, against its
    tolerances) through the Triton kernels."""
    import ghostkernels.__main__ as install_check

    for label, error, tolerance in install_check.check("cpu", dtype, torch.Generator().manual_seed(0)):
        assert error <= tolerance, f"{label}: {error:.3g}"
