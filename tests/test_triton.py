"""The Triton kernels against the reference: on a GPU when there is one, else on the CPU in
Triton's interpreter (TRITON_INTERPRET=1, set in conftest). CI runs them; they skip only beside
torch 2.6 to 2.9, whose Triton (older than 3.6) the package does not use (conftest)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ghostkernels
from ghostkernels import ghost_module_reference, triton_ghost
from ghostkernels.reference import ghost_module_gated_reference, ghost_module_masked_reference, output_memory_format

from conftest import make_input, make_weights, needs_triton_kernels

pytestmark = needs_triton_kernels

BENCH = Path(__file__).resolve().parents[1] / "bench"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 on a GPU runs its dots as TF32; the interpreter computes in true float32. float64 runs
# FMA loops on a GPU (tl.dot has no float64 there), so it is tested there too. On a GPU float32
# is test_float32's alone: each dtype is a compile of every kernel variant, and the file took
# 197 s there against its 3 minutes (H200, 2026-12-04).
DTYPES = {"cpu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
          "cuda": [torch.float64, torch.float16, torch.bfloat16]}[DEVICE]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5 if DEVICE == "cpu" else 1e-2,
             torch.float16: 1e-2, torch.bfloat16: 2e-2}

# (ratio, dw, stride, activation, channels_last, primary kernel, batch, oup): together they
# cover ratio 2-4, dw 1/3/5/7, stride 1/2, relu/none, both layouts, k 1/3, batch 0/1/2, odd oup.
CASES = [
    (2, 3, 1, "relu", False, 1, 2, 7),
    (2, 3, 1, "relu", True, 1, 1, 8),
    (3, 5, 2, "none", True, 1, 2, 11),
    (4, 7, 1, "relu", False, 1, 1, 13),
    (4, 1, 2, "relu", True, 1, 2, 15),
    (2, 5, 1, "none", False, 3, 1, 9),
    (3, 3, 2, "relu", True, 3, 2, 10),
    (2, 3, 1, "relu", False, 1, 0, 8),
]


def case_id(case):
    ratio, dw, stride, act, cl, kernel, batch, oup = case
    return f"r{ratio}-d{dw}-s{stride}-{act}-{'cl' if cl else 'nchw'}-k{kernel}-n{batch}-o{oup}"


def differentiated_reference(leaves, out, oup, stride, act):
    """The float64 reference whose gradients the backward of the forward that wrote `out` must
    give: with `out`'s own ReLU masks (on a GPU, TF32 and half precision put a pre-activation
    within rounding of zero on either side, and each flip moves a gradient by a whole value)."""
    if act == "relu":
        return ghost_module_masked_reference(*leaves, out_channels=oup, stride=stride, relu_masks_of=out.detach())
    return ghost_module_reference(*leaves, out_channels=oup, stride=stride, activation=act)


def check(case, dtype, inp=5, size=(9, 11), **tiles):
    """Forward and backward of the launchers against autograd over the float64 reference."""
    ratio, dw, stride, act, cl, kernel, batch, oup = case
    x = make_input(batch, inp, *size, channels_last=cl, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(inp, oup, ratio, dw, kernel, dtype=dtype)]
    out = triton_ghost.forward(x, *weights, oup, stride, act, config=tiles.get("config"))

    leaves = [t.detach().double().requires_grad_() for t in (x, *weights)]
    expected = ghost_module_reference(*leaves, out_channels=oup, stride=stride, activation=act)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(differentiated_reference(leaves, out, oup, stride, act), leaves, grad)
    grads = triton_ghost.backward(grad.to(dtype), out, x, *weights, oup, stride, act,
                                  **{k: v for k, v in tiles.items() if k == "tile_pixels"})

    assert out.dtype == dtype and out.shape == expected.shape
    expected_format = torch.channels_last if cl and batch > 0 else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)
    tol = TOLERANCE[dtype]
    for actual, reference in zip((out, *grads), (expected, *expected_grads)):
        scale = max(reference.abs().max().item() if reference.numel() else 0.0, 1.0)
        torch.testing.assert_close(actual.double(), reference.to(actual.device), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(case, dtype):
    check(case, dtype)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=case_id)
def test_float32(case):
    """Forward and backward in float32 on every device: both layouts, the backward by rows and by the
    tap loop, stride 2
    (on a GPU the dots run as TF32, GHOSTKERNELS_TF32)."""
    check(case, torch.float32)


def test_many_tiles_channel_blocks_and_backward_tiles():
    """Several forward tiles per image (halos crossing tile edges), several channel blocks,
    several backward tiles."""
    small = dict(triton_ghost.heuristic_config(20, 35, DTYPES[0], False), block_p=32, block_c=16)
    # 72 and 90 pixels: 3+ forward tiles of 32, 5 and 3 backward tiles; 20 and 17 intrinsic
    # channels: two blocks of 16, the last one short (sized for the interpreter: 18 s, was 55)
    check((2, 3, 1, "relu", True, 1, 2, 40), DTYPES[0], inp=20, size=(9, 8), config=small, tile_pixels=16)
    check((3, 5, 1, "none", False, 1, 1, 50), DTYPES[0], inp=7, size=(9, 10), config=small, tile_pixels=32)
    check((2, 7, 1, "relu", True, 3, 2, 12), DTYPES[0], inp=7, size=(13, 9), config=small)


@pytest.mark.parametrize("height, width, stride, act, channels_last", [
    (35, 37, 1, "relu", True), (17, 5, 1, "none", False), (2, 66, 2, "relu", False), (17, 1, 1, "none", True)])
def test_backward_rows_strips_and_column_blocks(height, width, stride, act, channels_last):
    """The 3 x 3 backward of ratio 2 (_ghost_backward_rows3_kernel) walks strips of at most 16 rows
    and blocks of 32 (8 columns and fewer: 32 channels; else 16) columns: several of each, a last
    one cut short, a single row or column; 18 intrinsic channels (two blocks of 16, the second short,
    or one of 32) and an odd oup (the slice drops a ghost)."""
    rows3 = triton_ghost.takes_backward_rows3
    assert rows3(3, 1) and not rows3(3, 2) and not rows3(5, 1)
    check((2, 3, stride, act, channels_last, 1, 2, 35), DTYPES[0], inp=4, size=(height, width))


@pytest.mark.parametrize("height, width, block_p", [(7, 7, 64), (14, 14, 64), (56, 56, 128), (112, 112, 128),
                                                   (9, 11, 16), (5, 300, 64)])
def test_tiling_fits_its_block_and_covers_the_image(height, width, block_p):
    tiles, tile_h, tile_w = triton_ghost.tiling(height, width, block_p)
    assert tile_h * tile_w <= block_p and tile_h <= height and tile_w <= width
    assert tiles == -(-height // tile_h) * -(-width // tile_w)
    if (height, width) in [(14, 14), (56, 56), (112, 112)]:  # GhostNet's sides: few idle lanes
        assert height * width >= 0.75 * tiles * block_p


# (inp, oup, ratio, dw, activation, bias): the library GEMM writes z1 (no bias) into a buffer and
# the kernel reads it back, adds the bias and activates it for x1 and the depthwise op.
LIBRARY_CASES = [(6, 9, 2, 3, "relu", True), (5, 10, 3, 5, "none", True), (7, 8, 2, 1, "relu", False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LIBRARY_CASES, ids=str)
def test_library_primary(case, dtype):
    inp, oup, ratio, dw, act, bias = case
    x = make_input(2, inp, 9, 11, channels_last=True, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) if w is not None else None for w in make_weights(inp, oup, ratio, dw, dtype=dtype,
                                                                             bias=bias)]
    init = weights[0].shape[0]
    config = dict(triton_ghost.heuristic_config(inp, init * (ratio - 1), dtype, True),
                  primary="library", block_p=32)
    out = triton_ghost.forward(x, *weights, oup, 1, act, config=config)
    expected = ghost_module_reference(*(t.double() if t is not None else None for t in (x, *weights)),
                                      out_channels=oup, activation=act)
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * max(expected.abs().max().item(), 1.0))
    with pytest.raises(ValueError, match="library primary needs"):
        triton_ghost.forward(x.contiguous(), *weights, oup, 1, act, config=config)


@pytest.mark.parametrize("height, width", [(35, 37), (17, 1), (1, 33)])
def test_library_route_strips_and_column_blocks(height, width):
    """The 3 x 3 pass of the library route walks strips of at most 16 rows and blocks of 32
    columns: several of each, a last one cut short, a single row or column."""
    assert triton_ghost.rows3_plan(35, 37) == (12, 32)
    dtype = DTYPES[1] if DEVICE == "cpu" else torch.float16
    x = make_input(2, 6, height, width, channels_last=True, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(6, 21, 3, 3, dtype=dtype)]
    expected = ghost_module_reference(*(t.double() for t in (x, *weights)), out_channels=21)
    config = dict(triton_ghost.heuristic_config(6, 14, dtype, True), primary="library", block_c=16)
    out = triton_ghost.forward(x, *weights, 21, 1, "relu", config=config)
    torch.testing.assert_close(out.double(), expected, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * max(expected.abs().max().item(), 1.0))


@pytest.mark.parametrize("grid", [(7,), (7, 3)])
def test_direct_launches_key_on_tensor_dtype_and_alignment(monkeypatch, grid):
    """_run: a plan's first launch goes through Triton's JIT; where DIRECT_LAUNCH, the later ones
    whose tensors have the same dtypes and 16-byte alignment go straight to the kernel the JIT
    returned (on the grid made 3-D), with every argument in the kernel's order; other tensors go
    through the JIT again."""
    calls = []

    class Compiled:
        def __getitem__(self, launch_grid):
            assert launch_grid == (*grid, 1, 1)[:3]
            return lambda *args: calls.append(("direct", args))

    class Jit:
        arg_names = ["a", "b", "n", "K", "L"]

        def __getitem__(self, launch_grid):
            assert launch_grid == grid
            return lambda *args, **kwargs: calls.append(("jit", args, kwargs)) or Compiled()

    monkeypatch.setattr(triton_ghost, "DIRECT_LAUNCH", True)
    storage = torch.zeros(64)  # 64-byte aligned: floats 4 apart are 16 bytes apart
    b = storage[32:40]
    plan = triton_ghost._Plan(Jit(), {"num_warps": 2, "num_stages": 1}, grid, (storage[:8], b, 5), {"L": 4, "K": 3})
    for a in (storage[:8], storage[4:12], storage[1:9], storage[5:13], storage[:8].double()):
        triton_ghost._run(plan, (a, b))
    assert [c[0] for c in calls] == ["jit", "direct", "jit", "direct", "jit"]
    assert calls[0][2] == {"L": 4, "K": 3, "num_warps": 2, "num_stages": 1, **triton_ghost.LAUNCH_OPTIONS}
    assert calls[1][1][2:] == (5, 3, 4) and calls[1][1][0].data_ptr() == storage[4:12].data_ptr()


def test_launch_plans_are_reused_with_new_data():
    """A shape's launch plans (forward on both routes, backward by rows and by the tap loop), made
    at its first call, serve later calls with other tensors of that shape: values, and a storage
    offset that changes their alignment."""
    dtype = DTYPES[1] if DEVICE == "cpu" else torch.float16
    tol = TOLERANCE[dtype]
    weights = [w.to(DEVICE) for w in make_weights(6, 13, 2, 3, dtype=dtype)]
    weights_dw5 = [*weights[:2], torch.randn(7, 1, 5, 5, dtype=dtype, device=DEVICE) / 5, weights[3]]
    plans = None
    for offset in (0, 0, 1):
        flat = torch.randn(2 * 6 * 9 * 11 + offset, dtype=dtype, device=DEVICE)[offset:]
        x = flat.view(2, 9, 11, 6).permute(0, 3, 1, 2)  # channels_last, maybe misaligned
        grad = torch.randn(2, 13, 9, 11, dtype=dtype, device=DEVICE)
        for cheap in (weights, weights_dw5):
            expected = ghost_module_reference(*(t.double() for t in (x, *cheap)), out_channels=13)
            for primary in ("kernel", "library"):
                config = dict(triton_ghost.heuristic_config(6, 7, dtype, True), primary=primary)
                out = triton_ghost.forward(x, *cheap, 13, 1, "relu", config=config)
                torch.testing.assert_close(out.double(), expected, rtol=tol,
                                           atol=tol * max(expected.abs().max().item(), 1.0))
            leaves = [t.detach().double().requires_grad_() for t in (x, *cheap)]
            expected_grads = torch.autograd.grad(differentiated_reference(leaves, out, 13, 1, "relu"), leaves,
                                                 grad.double())
            for actual, reference in zip(triton_ghost.backward(grad, out, x, *cheap, 13, 1, "relu"), expected_grads):
                torch.testing.assert_close(actual.double(), reference, rtol=tol,
                                           atol=tol * max(reference.abs().max().item(), 1.0))
        plans = plans or len(triton_ghost._plans)
        assert len(triton_ghost._plans) == plans  # no new plan after the first call of each route


@pytest.fixture
def tf32_setting():
    """torch's TF32 setting of convolutions, restored after the test."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(torch.backends.cudnn, "fp32_precision"):  # the legacy flag alone
        saved = torch.backends.cudnn.allow_tf32
        yield None
        torch.backends.cudnn.allow_tf32 = saved
        return
    saved = conv.fp32_precision, torch.backends.cudnn.fp32_precision
    yield conv
    conv.fp32_precision, torch.backends.cudnn.fp32_precision = saved


def test_float32_dots_follow_torchs_tf32_setting_of_convolutions(tf32_setting, monkeypatch):
    """The layers the op replaces are convolutions, whose float32 PyTorch runs in TF32 only where
    its flag allows: the dots ran TF32 whatever the user set. A launch plan each way."""
    x = torch.randn(1, 6, 5, 5, device=DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(6, 12, 2, 3, dtype=torch.float32)]
    config = dict(triton_ghost.heuristic_config(6, 6, torch.float32, True), primary="kernel")
    monkeypatch.setattr(triton_ghost, "_plans", {})
    precisions = []
    for allow in (True, False, True):
        torch.backends.cudnn.allow_tf32 = allow  # the legacy flag, which sets the new API's too
        precisions.append(triton_ghost._input_precision(torch.float32))
        triton_ghost.forward(x, *weights, 12, 1, "relu", config=config)
    assert precisions == ["tf32", "ieee", "tf32"]
    torch.backends.cudnn.allow_tf32 = False
    assert ghostkernels.backends()["cuda"]["float32_dots"].startswith("IEEE, as PyTorch's float32 convolutions")
    torch.backends.cudnn.allow_tf32 = True
    assert ghostkernels.backends()["cuda"]["float32_dots"].startswith("TF32, as PyTorch's float32 convolutions")
    assert triton_ghost._input_precision(torch.float16) == "ieee"
    assert sorted(plan.constants["INPUT_PRECISION"] for plan in triton_ghost._plans.values()) == ["ieee", "tf32"]
    if tf32_setting is not None:  # torch 2.9's API: an operator's "none" defers to cuDNN's, then the global one
        tf32_setting.fp32_precision, torch.backends.cudnn.fp32_precision = "none", "tf32"
        assert triton_ghost._input_precision(torch.float32) == "tf32"
        tf32_setting.fp32_precision = "ieee"
        assert triton_ghost._input_precision(torch.float32) == "ieee"


def test_every_autotune_candidate_computes_the_same():
    """Whatever configuration the autotuner or the tuned table picks gives the reference's output."""
    dtype = DTYPES[1] if DEVICE == "cpu" else torch.float16  # float32 on the CPU: fast and exact enough
    x = make_input(1, 6, 10, 9, channels_last=True, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(6, 40, 2, 3, dtype=dtype)]
    expected = ghost_module_reference(*(t.double() for t in (x, *weights)), out_channels=40)
    candidates = triton_ghost.candidate_configs(6, 20, dtype, True)
    assert {c["primary"] for c in candidates} == {"kernel", "library"} and len(candidates) >= 12
    for config in candidates:
        out = triton_ghost.forward(x, *weights, 40, 1, "relu", config=config)
        torch.testing.assert_close(out.double(), expected, rtol=TOLERANCE[dtype],
                                   atol=TOLERANCE[dtype] * max(expected.abs().max().item(), 1.0), msg=str(config))


def test_fastest_config_skips_what_the_gpu_cannot_hold(monkeypatch):
    """The autotuner's and --tune's choice, with do_bench stubbed (it needs a GPU): the fastest
    candidate wins, and one that does not fit (OutOfResources) is skipped, not fatal."""
    import triton

    def fake_bench(fn, return_mode, **bench):
        assert return_mode == "median" and bench == {"warmup": 5, "rep": 25}
        return fn()

    def run(config):
        if config == "too big":
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return {"slow": 2.0, "fast": 1.0}[config]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    assert triton_ghost.fastest_config(["slow", "too big", "fast"], run, warmup=5, rep=25) == (1.0, "fast", 2)


@pytest.mark.parametrize("inp, init, size, batch, primary", [
    (80, 100, 14, 256, "library"), (80, 100, 14, 32, "kernel"), (80, 100, 14, 1, "kernel"),
    (112, 336, 14, 32, "library"), (960, 80, 7, 1, "library"), (16, 8, 112, 256, "library"),
    (16, 8, 112, 32, "kernel"), (24, 36, 56, 32, "kernel")])
def test_heuristic_route_follows_the_h200_measurements(inp, init, size, batch, primary):
    """GhostNet 1.0x shapes whose faster route bench/results/NVIDIA-H200-2026-12-04.md measured."""
    large = triton_ghost.primary_is_large(batch * size * size, inp, init)
    assert triton_ghost.heuristic_config(inp, init, torch.float16, True, large)["primary"] == primary


def test_tuned_table_and_autotune_cache(tmp_path, monkeypatch):
    """The committed table parses and holds complete configs; the autotune cache round-trips."""
    with open(triton_ghost._TUNED_TABLE) as f:
        table = json.load(f)
    keys = set(triton_ghost.heuristic_config(16, 8, torch.float16, True))
    for device, configs in table.items():
        for key, config in configs.items():
            assert set(config) == keys, (device, key)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = triton_ghost.heuristic_config(160, 480, torch.float16, True)
    triton_ghost._tuned_configs.cache_clear()
    try:
        triton_ghost.save_config(triton_ghost._autotune_cache_file(), "Some GPU",
                                 "160-480-480-960-7x7-k1-d3-s1-float16-cl-large", config)
        triton_ghost._tuned_configs.cache_clear()
        assert triton_ghost._tuned_configs("Some GPU")["160-480-480-960-7x7-k1-d3-s1-float16-cl-large"] == config
    finally:
        triton_ghost._tuned_configs.cache_clear()


@pytest.mark.parametrize("size", [1, 2])
def test_wide_nchw_input_of_a_tiny_plane(size):
    """More than NCHW_MAX_INP input channels in NCHW go through channels_last; a 1 x 1 plane is
    both layouts at once, and the conversion recursed forever (GhostNet's last stage on 32 x 32
    inputs)."""
    x = make_input(2, triton_ghost.NCHW_MAX_INP + 8, size, size, dtype=DTYPES[0]).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(x.shape[1], 12, 2, 3, dtype=DTYPES[0])]
    out = triton_ghost.forward(x, *weights, 12, 1, "relu")
    expected = ghost_module_reference(x, *weights, out_channels=12)
    tol = TOLERANCE[DTYPES[0]]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * max(expected.abs().max().item(), 1.0))


def test_without_biases():
    x = make_input(2, 6, 7, 7, dtype=DTYPES[0]).to(DEVICE)
    w1, _, w2, _ = [w.to(DEVICE) if w is not None else None for w in make_weights(6, 10, 2, 3, dtype=DTYPES[0])]
    out = triton_ghost.forward(x, w1, None, w2, None, 10, 1, "relu")
    expected = ghost_module_reference(x, w1, None, w2, None, out_channels=10)
    tol = TOLERANCE[DTYPES[0]]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * max(expected.abs().max().item(), 1.0))


def test_backends_report_triton_for_cuda():
    assert ghostkernels.backends()["cuda"]["backend"] == "triton", ghostkernels.backends()["cuda"]


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA registration needs a GPU; the kernels run above either way")
def test_cuda_op_autograd_and_compile():
    x = make_input(2, 16, 14, 14, channels_last=True, dtype=torch.float16).cuda().requires_grad_()
    weights = [w.cuda().requires_grad_() for w in make_weights(16, 32, 2, 3, dtype=torch.float16)]
    out = ghostkernels.ghost_module(x, *weights, out_channels=32)
    out.float().square().sum().backward()
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module.default, (x, *weights, 32, 1, "relu"))
    gate = torch.randn(2, 32, 7, 7, dtype=torch.float16, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_gated.default, (x, *weights, gate, 32, 1, "relu"))
    scale = torch.rand(2, 16, 1, 1, dtype=torch.float16, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_scaled.default, (x, scale, *weights, 32, 1, "relu"))
    se = [torch.randn(4, 16, 1, 1), torch.randn(4), torch.randn(16, 4, 1, 1), torch.randn(16)]
    se = [t.to("cuda", torch.float16).requires_grad_() for t in se]
    torch.library.opcheck(torch.ops.ghostkernels.squeeze_excite_gate.default, (x, *se))
    # the fused ghost1 + stride-2 conv and the residual in the stores, as the CUDA kernels run them
    conv = [t.to("cuda", torch.float16).requires_grad_() for t in (torch.randn(32, 1, 3, 3) / 3, torch.randn(32))]
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_depthwise.default,
                          (x, *weights, 32, 1, "relu", *conv, 2))
    residual = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_residual.default,
                          (x, None, *weights, 32, 1, "relu", residual))
    module = ghostkernels.GhostModule(16, 32).cuda().half().eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-2, atol=1e-2)


# (ratio, dw, stride, activation, channels_last, primary kernel, batch, oup), output size, gate size:
# odd sizes that pooling floors and upsampling undoes (7 -> 3 -> 7), non-square, 1x1 gates.
GATED_CASES = [
    ((2, 3, 1, "relu", False, 1, 2, 7), (7, 7), (3, 3)),
    ((3, 5, 2, "none", True, 1, 1, 10), (9, 11), (2, 3)),
    ((2, 3, 1, "relu", True, 3, 2, 8), (6, 5), (1, 1)),
    ((4, 1, 1, "relu", False, 1, 1, 9), (5, 8), (5, 8)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, size, gate_size", GATED_CASES, ids=lambda c: str(c))
def test_gated_forward(case, size, gate_size, dtype):
    ratio, dw, stride, act, cl, kernel, batch, oup = case
    x = make_input(batch, 5, *size, channels_last=cl, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(5, oup, ratio, dw, kernel, dtype=dtype)]
    out_size = [(s - 1) // stride + 1 for s in size]
    gate = torch.randn(batch, oup, *(min(g, o) for g, o in zip(gate_size, out_size)), dtype=dtype, device=DEVICE)
    out = triton_ghost.forward(x, *weights, oup, stride, act, gate=gate)
    expected = ghost_module_gated_reference(*(t.double() for t in (x, *weights, gate)),
                                            out_channels=oup, stride=stride, activation=act)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected.to(out.device), rtol=tol,
                               atol=tol * max(expected.abs().max().item(), 1.0))


# (ratio, dw, activation, oup, size, gate size) on the library route: the rows kernel (several strips
# and column blocks in the last), the tap loop (5 x 5), 1 x 1 and odd gates.
GATED_LIBRARY_CASES = [(2, 3, "relu", 9, (9, 11), (4, 5)), (3, 5, "none", 10, (7, 8), (1, 1)),
                       (2, 3, "relu", 35, (35, 37), (17, 18))]


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]], ids=str)
@pytest.mark.parametrize("case", GATED_LIBRARY_CASES, ids=str)
def test_gated_library_route(case, dtype):
    """GhostNetV2's gated Ghost op with x1 from the library GEMM, the gate applied in the rows kernel's
    stores as in the tap loop's."""
    ratio, dw, act, oup, size, gate_size = case
    x = make_input(2, 6, *size, channels_last=True, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(6, oup, ratio, dw, dtype=dtype)]
    gate = torch.randn(2, oup, *gate_size, dtype=dtype, device=DEVICE)
    init = weights[0].shape[0]
    config = dict(triton_ghost.heuristic_config(6, init * (ratio - 1), dtype, True), primary="library")
    out = triton_ghost.forward(x, *weights, oup, 1, act, gate=gate, config=config)
    expected = ghost_module_gated_reference(*(t.double() for t in (x, *weights, gate)), out_channels=oup,
                                            activation=act)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected.to(out.device), rtol=tol,
                               atol=tol * max(expected.abs().max().item(), 1.0))


# (height, width, oup, activation, biases, dtype): the Ghost plane, its stride-2 conv's output is half
# of it rounded up: several strips and a short last one (35 rows -> 18: 9 + 9), two column blocks
# (70 columns -> 35: 32 + 3), planes of 8 columns and fewer (32 channels a program), a single row
# and column, odd sizes (the last output column reads a padding column), odd oup, no biases.
GHOST_DEPTHWISE_CASES = [(9, 11, 9, "relu", True, 0), (35, 70, 35, "relu", True, 0), (1, 1, 8, "none", False, 0),
                         (4, 3, 7, "none", True, 0), (9, 11, 9, "relu", True, 2)]


@pytest.mark.parametrize("case", GHOST_DEPTHWISE_CASES, ids=str)
def test_ghost_depthwise_rows(case):
    """ghost_module_depthwise's GhostNet case (triton_ghost.forward_depthwise: the Ghost rows fed
    straight into the stride-2 conv) against the Ghost op's reference, then the conv."""
    height, width, oup, act, bias, dtype_index = case
    dtype = DTYPES[dtype_index]
    x = make_input(2, 4, height, width, channels_last=True, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) if w is not None else None for w in make_weights(4, oup, 2, 3, dtype=dtype, bias=bias)]
    conv_weight = (torch.randn(oup, 1, 3, 3, dtype=dtype) / 3).to(DEVICE)
    conv_bias = torch.randn(oup, dtype=dtype).to(DEVICE) if bias else None
    assert triton_ghost.takes_depthwise_rows3(x, weights[0], weights[2], conv_weight, 1, 2)
    out = triton_ghost.forward_depthwise(x, *weights, oup, act, conv_weight, conv_bias)
    as_double = [t.double() if t is not None else None for t in (x, *weights, conv_weight, conv_bias)]
    ghost = ghost_module_reference(*as_double[:5], out_channels=oup, activation=act)
    expected = torch.nn.functional.conv2d(ghost.to(dtype).double(), as_double[5], as_double[6], 2, 1, groups=oup)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * max(expected.abs().max().item(), 1.0))


def test_ghost_depthwise_op_takes_the_kernel_where_it_applies():
    """The op's CUDA kernel (on the interpreter's CPU tensors here): the fused kernel for GhostNet's
    case, the Ghost op then the library conv for a 5 x 5 or stride-1 conv, an NCHW input, ratio 3."""
    from ghostkernels import ghost_depthwise

    dtype = DTYPES[0]
    for cl, ratio, k, conv_stride in ((True, 2, 3, 2), (True, 2, 5, 2), (True, 2, 3, 1), (False, 2, 3, 2),
                                      (True, 3, 3, 2)):
        x = make_input(2, 4, 7, 8, channels_last=cl, dtype=dtype).to(DEVICE)
        weights = [w.to(DEVICE) for w in make_weights(4, 9, ratio, 3, dtype=dtype)]
        conv = [(torch.randn(9, 1, k, k, dtype=dtype) / k).to(DEVICE), torch.randn(9, dtype=dtype).to(DEVICE)]
        out = ghost_depthwise._cuda(x, *weights, 9, 1, "relu", *conv, conv_stride)
        ghost = ghost_module_reference(x, *weights, out_channels=9)
        expected = torch.nn.functional.conv2d(ghost, *conv, conv_stride, k // 2, groups=9)
        assert triton_ghost.takes_depthwise_rows3(x, weights[0], weights[2], conv[0], 1, conv_stride) == \
            (cl and ratio == 2 and k == 3 and conv_stride == 2)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


# (route, ratio, dw, primary kernel, activation, channels_last, scaled, gated): the residual added in
# the stores of the rows kernel (library route, 3x3; a k x k primary), of the tap loop on the library
# route (5x5) and on the kernel route (NCHW too), with the SE gate's scale, with an attention gate.
RESIDUAL_CASES = [("library", 2, 3, 1, "none", True, False, False), ("library", 3, 5, 1, "none", True, True, False),
                  ("kernel", 2, 3, 1, "relu", False, False, False), ("kernel", 2, 3, 1, "none", True, True, False),
                  ("kernel", 2, 3, 3, "relu", True, False, False), ("kernel", 2, 3, 1, "relu", True, False, True)]


@pytest.mark.parametrize("dtype", DTYPES[:3] if DEVICE == "cpu" else [torch.float16], ids=str)
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=str)
def test_residual_added_in_the_stores(case, dtype):
    """triton_ghost.forward(..., residual=r) is forward(...).add_(r): the residual added to each
    output element as it is stored, after the output's rounding, as ghost_module_residual means."""
    route, ratio, dw, kernel, act, cl, scaled, gated = case
    inp, oup = 6, 9
    x = make_input(2, inp, 7, 9, channels_last=cl, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(inp, oup, ratio, dw, kernel, dtype=dtype)]
    init = weights[0].shape[0]
    extra = dict(scale=torch.rand(2, inp, 1, 1, dtype=dtype, device=DEVICE) + 0.5 if scaled else None,
                 gate=torch.randn(2, oup, 4, 5, dtype=dtype, device=DEVICE) if gated else None,
                 config=dict(triton_ghost.heuristic_config(inp, init * (ratio - 1), dtype, True), primary=route))
    residual = torch.randn(2, oup, 7, 9, dtype=dtype, device=DEVICE).contiguous(memory_format=output_memory_format(x))
    fused = triton_ghost.forward(x, *weights, oup, 1, act, residual=residual, **extra)
    separate = triton_ghost.forward(x, *weights, oup, 1, act, **extra).add_(residual)
    assert fused.stride() == separate.stride()
    # the same roundings in the same order: equal in the interpreter (a GPU may contract differently)
    tol = 0 if DEVICE == "cpu" else TOLERANCE[dtype]
    torch.testing.assert_close(fused, separate, rtol=tol, atol=tol * max(separate.abs().max().item(), 1.0))


@pytest.mark.parametrize("kind", ["broadcast", "float64", "other layout", "alpha 2", "wide nchw", "empty"])
def test_residual_op_takes_add_after_where_the_kernels_cannot(kind):
    """ghost_module_residual's CUDA kernel (called here on the interpreter's CPU tensors): a residual
    that broadcasts, has another dtype or layout, an alpha other than 1, a wide NCHW input (converted
    to channels_last and back) or an empty batch gets out.add_(residual, alpha) after the kernel."""
    from ghostkernels.ghost_residual import _ghost_residual_cuda

    dtype = DTYPES[1]
    inp, batch, cl = (40, 2, False) if kind == "wide nchw" else (6, 0 if kind == "empty" else 2, True)
    x = make_input(batch, inp, 5, 6, channels_last=cl, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(inp, 9, 2, 3, dtype=dtype)]
    shape = (1, 9, 1, 1) if kind == "broadcast" else (batch, 9, 5, 6)
    residual = torch.randn(shape, dtype=torch.float64 if kind == "float64" else dtype, device=DEVICE)
    if kind != "other layout":
        residual = residual.contiguous(memory_format=output_memory_format(x))
    alpha = 2 if kind == "alpha 2" else 1
    out = _ghost_residual_cuda(x, None, *weights, 9, 1, "relu", residual, alpha)
    expected = triton_ghost.forward(x, *weights, 9, 1, "relu").add_(residual, alpha=alpha)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("channels_last, kernel", [(False, 1), (True, 1), (False, 3)], ids=["nchw", "cl", "nchw-k3"])
def test_nan_propagates_like_relu(channels_last, kernel):
    """relu(nan) is nan in the forward (tl.maximum's default, maxnum, returns 0 for NaN), and
    relu's backward passes the grad where the output is NaN, as torch's threshold_backward."""
    dtype = DTYPES[0]
    x = make_input(2, 5, 7, 9, channels_last=channels_last, dtype=dtype)
    x[0, 1, 2, 3] = x[1, :, -1, -1] = float("nan")
    x = x.to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(5, 8, 2, 3, kernel, dtype=dtype)]
    out = triton_ghost.forward(x, *weights, 8, 1, "relu")
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, *weights)]
    expected = ghost_module_reference(*leaves, out_channels=8)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(differentiated_reference(leaves, out.cpu(), 8, 1, "relu"), leaves, grad)
    grads = triton_ghost.backward(grad.to(DEVICE, dtype), out, x, *weights, 8, 1, "relu")
    assert expected.isnan().any() and expected_grads[0].isfinite().all()
    tol = TOLERANCE[dtype]
    for actual, reference in zip((out, *grads), (expected, *expected_grads)):
        scale = max(reference.nan_to_num(0).abs().max().item(), 1.0)
        torch.testing.assert_close(actual.double().cpu(), reference, rtol=tol, atol=tol * scale, equal_nan=True)


def test_nan_in_a_cheap_weight_reaches_its_channel():
    dtype = DTYPES[0]
    x = make_input(1, 5, 6, 7, dtype=dtype).to(DEVICE)
    weights = make_weights(5, 8, 2, 3, dtype=dtype)
    weights[2][1, 0, 1, 1] = float("nan")
    weights = [w.to(DEVICE) for w in weights]
    out = triton_ghost.forward(x, *weights, 8, 1, "relu")
    expected = ghost_module_reference(*(t.double().cpu() for t in (x, *weights)), out_channels=8)
    assert expected[:, 5].isnan().all() and expected[:, :5].isfinite().all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol,
                               atol=tol * max(expected.nan_to_num(0).abs().max().item(), 1.0), equal_nan=True)


def test_kernels_compile_for_hopper():
    """Each kernel compiles for sm_90 with Triton's own ptxas, no GPU needed (in a process of its
    own: the interpreter's kernels cannot be compiled). float64 once failed on a GPU (tl.dot has
    no float64 there) while the interpreter ran it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(BENCH), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", "import json, gpu_compile_check as c; print(json.dumps(c.smoke()))"],
                          cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(usage) == 17 and all(u["REG"] > 0 and u["STACK"] == 0 for u in usage.values()), usage
    # Accesses along channels vectorise: 60 intrinsic channels in float16 allow 8-byte vectors, 960
    # allow 16 (the channel masks once kept every float16 access at 2 bytes).
    for name, widest in (("forward library torch.float16", 8), ("forward library residual torch.float16", 8),
                         ("backward torch.float16", 8),
                         ("backward tap loop torch.float16", 8),
                         ("squeeze_excite_gate torch.float16", 16), ("direct_conv dw torch.float64", 16)):
        assert usage[name]["LOAD"] >= widest, (name, usage[name])
    assert usage["forward library torch.float16"]["STORE"] >= 8, usage
    assert usage["direct_conv stem torch.float16"]["STORE"] == 16, usage  # its 3-channel input held them at 2


# (ratio, dw, stride, activation, channels_last, primary kernel, batch, oup), route: the SE gate
# of ghost_module_scaled read with x, on the kernel route (in the load), the library route (in
# per-image weights of a batched GEMM) and a k x k primary (a product before the library conv).
SCALED_CASES = [((2, 3, 1, "relu", True, 1, 2, 9), "kernel"), ((2, 3, 1, "none", True, 1, 2, 8), "library"),
                ((3, 5, 2, "relu", False, 1, 1, 10), "kernel"), ((2, 3, 1, "relu", True, 3, 2, 8), "kernel")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, route", SCALED_CASES, ids=str)
def test_scaled_forward(case, route, dtype):
    ratio, dw, stride, act, cl, kernel, batch, oup = case
    x = make_input(batch, 6, 9, 10, channels_last=cl, dtype=dtype).to(DEVICE)
    scale = torch.rand(batch, 6, 1, 1, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(6, oup, ratio, dw, kernel, dtype=dtype)]
    config = dict(triton_ghost.heuristic_config(6, weights[2].shape[0], dtype, True), primary=route)
    out = triton_ghost.forward(x, *weights, oup, stride, act, config=config, scale=scale)
    expected = ghost_module_reference((x * scale).double(), *(w.double() for w in weights), out_channels=oup,
                                      stride=stride, activation=act)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected.to(out.device), rtol=tol,
                               atol=tol * max(expected.abs().max().item(), 1.0))


# GhostNet 1.0x's Ghost-module shapes, each route the heuristic takes; the 112x112 ones and
# 24->72@56 (kernel route, ~10 s each in the interpreter) are left to the GPU run.
REAL_SHAPES = [(48, 24, 56), (72, 40, 28), (40, 240, 28), (240, 80, 14), (80, 480, 14), (672, 112, 14),
               (672, 160, 7), (160, 960, 7), (16, 48, 14)]


@pytest.mark.parametrize("inp, oup, size", REAL_SHAPES, ids=lambda v: str(v))
def test_ghostnet_shapes_with_the_heuristic_config(inp, oup, size):
    dtype = DTYPES[1] if DEVICE == "cpu" else torch.float16  # float32 in the interpreter
    x = make_input(1, inp, size, size, channels_last=True, dtype=dtype).to(DEVICE)
    weights = [w.to(DEVICE) for w in make_weights(inp, oup, 2, 3, dtype=dtype)]
    out = triton_ghost.forward(x, *weights, oup, 1, "relu")
    expected = ghost_module_reference(*(t.double() for t in (x, *weights)), out_channels=oup)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected.to(out.device), rtol=tol,
                               atol=tol * max(expected.abs().max().item(), 1.0))


def test_wide_nchw_input_goes_through_channels_last():
    """An NCHW x wider than NCHW_MAX_INP is converted, computed in channels_last (on the route its
    size picks), and returned NCHW; narrow NCHW inputs stay on the kernel route, in place."""
    dtype = DTYPES[1] if DEVICE == "cpu" else torch.float16
    for inp in (triton_ghost.NCHW_MAX_INP + 8, 8):
        x = make_input(2, inp, 9, 7, dtype=dtype).to(DEVICE)
        scale = torch.rand(2, inp, 1, 1, dtype=dtype).to(DEVICE)
        weights = [w.to(DEVICE) for w in make_weights(inp, 20, 2, 3, dtype=dtype)]
        out = triton_ghost.forward(x, *weights, 20, 1, "relu", scale=scale)
        expected = ghost_module_reference(*(t.double() for t in (x * scale, *weights)), out_channels=20)
        assert out.is_contiguous()
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out.double(), expected.to(out.device), rtol=tol,
                                   atol=tol * max(expected.abs().max().item(), 1.0))
