"""torch.set_float32_matmul_precision("medium"): the fused CPU forward kernels' float32 GEMMs run
bfloat16 where the CPU has an engine for it, AMX or fast AVX512-BF16 dot products
(csrc/bf16_gemm.h), and nothing else changes. With an engine the primary conv must equal the
reference with x and W1 rounded to bfloat16 (the products summed in float32), NCHW and
channels_last; without one, on AMX below 32 input channels, and in float64 the output must be
the float32 one, bit for bit. test_dot_product_engine runs this file again on the dot products
wherever the CPU has AVX512-BF16 and this run is on another engine or none, so an AMX machine
tests both engines."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ghostkernels
from ghostkernels.models import ghostnet_050

from conftest import CPP_LIBRARY, randomise_bn

if not CPP_LIBRARY:
    pytest.skip("the bfloat16 GEMMs are the C++ library's", allow_module_level=True)
ops = torch.ops.ghostkernels
BF16, ENGINE = ops.bf16_gemm_status()
AMX = BF16 and ENGINE.startswith("AMX")
AVX512_BF16 = os.path.exists("/proc/cpuinfo") and "avx512_bf16" in open("/proc/cpuinfo").read().split()


def in_bf16(depth):
    """Whether a GEMM over `depth` products runs in bfloat16 under "medium" here (csrc/bf16_gemm.h)."""
    return BF16 and (depth >= 32 or not AMX)


@pytest.fixture
def precision():
    """Set torch's float32 matmul precision inside a test; restored after it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def weights(inp, oup, ratio=2, dw=3, dtype=torch.float32):
    init = -(-oup // ratio)
    ghosts = init * (ratio - 1)
    return (torch.randn(init, inp, 1, 1, dtype=dtype) / inp ** 0.5, torch.randn(init, dtype=dtype),
            torch.randn(ghosts, 1, dw, dw, dtype=dtype), torch.randn(ghosts, dtype=dtype))


def bf16_rounded_reference(x, w1, b1, w2, b2, oup, stride, activation):
    """The Ghost op in float64 on x and W1 rounded to bfloat16, as the bfloat16 GEMMs compute it."""
    return ops.ghost_module(x.bfloat16().double(), w1.bfloat16().double(), b1.double(), w2.double(), b2.double(),
                            oup, stride, activation)


@pytest.mark.parametrize("inp, oup, ratio, dw, stride, activation, size", [
    (40, 51, 2, 3, 1, "relu", (14, 14)),   # odd oup, K padded from 40 to 64
    (64, 96, 3, 5, 2, "none", (9, 11)),    # ratio 3, stride 2, N not a multiple of 16
    (300, 37, 4, 7, 1, "relu", (5, 5)),    # ratio 4, dw 7, K past a tile's depth several times
    (160, 960, 2, 1, 1, "relu", (7, 7)),   # GhostNet's ghost1 at 7x7; dw 1
    (16, 16, 2, 3, 1, "relu", (12, 12)),   # below 32 input channels: float32 on AMX
    (7, 10, 2, 3, 1, "relu", (5, 10)),     # an odd depth: its last pair half zero; 48 + 2 columns
    (40, 66, 2, 3, 1, "relu", (7, 7)),     # 48 + 1 pixels, 32 + 1 channels: a dot-product tail
    (24, 40, 2, 3, 1, "relu", (6, 6)),     # 36 pixels: a strip three vectors wide with a column tail
    (30, 24, 2, 3, 1, "none", (6, 8)),     # 12 channels of 48 pixels: 8 + a half tile of 4 rows
    (20, 10, 2, 3, 1, "relu", (4, 4)),     # 5 channels of one vector's pixels: a half tile of 8 rows
])
@pytest.mark.parametrize("batch", [0, 1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_module(precision, inp, oup, ratio, dw, stride, activation, size, batch, channels_last):
    x = torch.randn(batch, inp, *size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = (*weights(inp, oup, ratio, dw), oup, stride, activation)
    precision("highest")
    exact = ops.ghost_module(x, *args)
    precision("medium")
    out = ops.ghost_module(x, *args)
    if in_bf16(inp):
        if batch:
            assert relative_error(out, bf16_rounded_reference(x, *args)) < 1e-5
            assert 1e-5 < relative_error(out, exact) < 2e-2  # bfloat16 operands, not float32 ones
    else:
        assert torch.equal(out, exact)


def test_scaled_residual_and_depthwise_forms(precision):
    """The SE-scaled ghost2 with its residual, and ghost1 with the stride-2 depthwise conv, within
    bfloat16's error of their float32 outputs (the scale is folded into x or W1 before rounding)."""
    inp, oup = 96, 40
    x, scale, residual = torch.randn(1, inp, 14, 14), torch.rand(1, inp, 1, 1), torch.randn(1, oup, 14, 14)
    ghost_args = (*weights(inp, oup), oup, 1, "none")
    w3, b3 = torch.randn(oup, 1, 3, 3), torch.randn(oup)
    calls = [lambda: ops.ghost_module_residual(x, scale, *ghost_args, residual),
             lambda: ops.ghost_module_scaled(x, scale, *ghost_args),
             lambda: ops.ghost_module_depthwise(x, *ghost_args[:-1], "relu", w3, b3, 2)]
    for call in calls:
        precision("highest")
        exact = call()
        precision("medium")
        error = relative_error(call(), exact)
        assert (1e-5 < error < 2e-2) if BF16 else error == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_float64_stays_exact(precision, channels_last):
    x = torch.randn(2, 48, 10, 10, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = (*weights(48, 64, dtype=torch.float64), 64, 1, "relu")
    precision("highest")
    exact = ops.ghost_module(x, *args)
    precision("medium")
    assert torch.equal(ops.ghost_module(x, *args), exact)


@pytest.mark.parametrize("size", [(14, 14), (1, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_conv2d(precision, size, batch):
    """Maps: bfloat16 GEMMs. 1x1 maps (conv_head, classifiers): float32 dot products on
    every CPU, not ATen's linear, which converts W to bfloat16 on every call."""
    x, weight, bias = torch.randn(batch, 80, *size), torch.randn(112, 80, 1, 1) / 9, torch.randn(112)
    expected = F.conv2d(x.double(), weight.double(), bias.double())
    precision("medium")
    out = ops.pointwise_conv2d(x, weight, bias)
    if size == (1, 1) or not BF16:
        assert relative_error(out, expected) < 1e-5
    else:
        rounded = F.conv2d(x.bfloat16().double(), weight.bfloat16().double(), bias.double())
        assert relative_error(out, rounded) < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_conv2d_pool(precision, batch):
    """GhostNet's last 1x1 conv, ReLU and pool (what freeze() fuses): the GEMM in bfloat16 as
    pointwise_conv2d's, then the same ReLU and mean."""
    x, weight, bias = torch.randn(batch, 160, 7, 7), torch.randn(96, 160, 1, 1) / 13, torch.randn(96)
    precision("medium")
    out = ops.pointwise_conv2d_pool(x, weight, bias, "relu")
    operands = (x.bfloat16(), weight.bfloat16()) if BF16 else (x, weight)
    expected = F.relu(F.conv2d(operands[0].double(), operands[1].double(), bias.double())).mean((2, 3), keepdim=True)
    assert relative_error(out, expected) < 1e-5


def test_backends_says_whether_it_is_on(precision):
    precision("medium")
    status = ghostkernels.backends()["cpu"]["bfloat16_matmul"]
    assert status.startswith("on:" if BF16 else "unavailable:"), status
    assert ENGINE in status
    precision("highest")
    status = ghostkernels.backends()["cpu"]["bfloat16_matmul"]
    assert status.startswith("off:" if BF16 else "unavailable:"), status


def test_accelerated_ghostnet(precision):
    """A whole accelerated GhostNet 0.5x: its logits within bfloat16's error of the float32 ones."""
    torch.manual_seed(0)
    model = randomise_bn(ghostnet_050()).eval()
    x = torch.randn(2, 3, 96, 96)
    fast = ghostkernels.accelerate(model)
    with torch.no_grad():
        expected = model(x)
        precision("medium")
        error = relative_error(fast(x), expected)
    assert error < 2e-2 if BF16 else error < 1e-5


@pytest.mark.parametrize("value, why", [("off", "off by GHOSTKERNELS_BF16_GEMM=off"),
                                        ("avx", "GHOSTKERNELS_BF16_GEMM=avx is none of auto, amx, avx512bf16, off")])
def test_engine_turned_off_keeps_float32(value, why):
    """GHOSTKERNELS_BF16_GEMM=off (or a value it does not know): backends() says so and "medium"
    leaves the kernels in float32 (the path of CPUs without an engine, run here whatever this CPU has)."""
    script = ("import torch, ghostkernels\n"
              "x, w1, b1, w2, b2 = torch.randn(1, 64, 9, 9), torch.randn(32, 64, 1, 1), torch.randn(32), "
              "torch.randn(32, 1, 3, 3), torch.randn(32)\n"
              "exact = torch.ops.ghostkernels.ghost_module(x, w1, b1, w2, b2, 64, 1, 'relu')\n"
              "torch.set_float32_matmul_precision('medium')\n"
              "assert torch.equal(torch.ops.ghostkernels.ghost_module(x, w1, b1, w2, b2, 64, 1, 'relu'), exact)\n"
              "status = ghostkernels.backends()['cpu']['bfloat16_matmul']\n"
              f"assert status == 'unavailable: {why}', status\n")
    env = dict(os.environ, GHOSTKERNELS_BF16_GEMM=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not AVX512_BF16, reason="the CPU has no AVX512-BF16")
@pytest.mark.skipif(ENGINE.startswith("AVX512-BF16") or os.environ.get("GHOSTKERNELS_BF16_GEMM") == "avx512bf16",
                    reason="this run is already on the dot products, or was asked for them")
def test_dot_product_engine():
    """This file's tests on the AVX512-BF16 dot products (GHOSTKERNELS_BF16_GEMM=avx512bf16), which
    the default picks only where they outpace float32 FMAs: every CPU with the instructions tests
    them (17 s), here unless this run is on them already."""
    env = dict(os.environ, GHOSTKERNELS_BF16_GEMM="avx512bf16")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.skipif(not BF16, reason="no engine here: this run is already the float32 path")
@pytest.mark.skipif("GHOSTKERNELS_BF16_GEMM" in os.environ, reason="a run of this file with an engine asked for")
def test_without_an_engine():
    """This file's tests with GHOSTKERNELS_BF16_GEMM=off: "medium" then keeps the kernels in float32,
    the path of every CPU without an engine (AVX2 ones, Xeons without AMX), which a CI machine with
    an engine would otherwise never run."""
    env = dict(os.environ, GHOSTKERNELS_BF16_GEMM="off")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                             "not test_dot_product_engine", __file__],
                            env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def frozen_copy(*tensors):
    """Copies of `tensors` marked as a frozen graph's constants (what freeze() does to its own)."""
    copies = [t.clone() for t in tensors]
    ops.mark_frozen_weights(copies)
    return copies


@pytest.mark.parametrize("batch", [1, 7])  # 7: the dots' tiles of 4, 2 and 1 image
def test_frozen_weights_in_the_gemvs(precision, batch):
    """In the bfloat16 mode the 1x1-map GEMV (conv_head, classifiers) and the SE gate's GEMVs read
    a frozen graph's weights as bfloat16 (x stays float32); other weights stay float32."""
    x = torch.randn(batch, 200, 1, 1)
    weight, bias = torch.randn(72, 200, 1, 1) / 14, torch.randn(72)
    (frozen,) = frozen_copy(weight)
    precision("medium")
    exact = F.conv2d(x.double(), weight.double(), bias.double())
    assert relative_error(ops.pointwise_conv2d(x, weight, bias), exact) < 1e-5
    rounded = F.conv2d(x.double(), weight.bfloat16().double(), bias.double())
    expected = rounded if BF16 else exact
    assert relative_error(ops.pointwise_conv2d(x, frozen, bias), expected) < 1e-5

    planes = torch.randn(batch, 96, 5, 5)
    w_reduce, b_reduce = torch.randn(40, 96, 1, 1) / 10, torch.randn(40)
    w_expand, b_expand = torch.randn(96, 40, 1, 1) / 6, torch.randn(96)

    def composed(w_r, w_e):
        hidden = F.relu(F.conv2d(planes.double().mean((2, 3), keepdim=True), w_r.double(), b_reduce.double()))
        return F.hardsigmoid(F.conv2d(hidden, w_e.double(), b_expand.double()))

    gate = ops.squeeze_excite_gate(planes, *frozen_copy(w_reduce, b_reduce, w_expand, b_expand))
    rounding = (lambda w: w.bfloat16()) if BF16 else (lambda w: w)
    assert relative_error(gate, composed(rounding(w_reduce), rounding(w_expand))) < 1e-5
    assert relative_error(ops.squeeze_excite_gate(planes, w_reduce, b_reduce, w_expand, b_expand),
                          composed(w_reduce, w_expand)) < 1e-5
    precision("highest")  # float32 again: the frozen weight read as it is
    assert relative_error(ops.pointwise_conv2d(x, frozen, bias), exact) < 1e-5


def test_frozen_ghostnet_weights(precision):
    """freeze() marks its graph's constants; the bfloat16 mode's logits stay within bfloat16's
    error of float32's, with the top-1 class kept."""
    torch.manual_seed(0)
    model = randomise_bn(ghostnet_050()).eval()
    x = torch.randn(4, 3, 64, 64)
    before = ops.frozen_weights_status()[0]
    frozen = ghostkernels.freeze(ghostkernels.accelerate(model), x)
    assert ops.frozen_weights_status()[0] > before
    with torch.no_grad():
        expected = model(x)
        precision("medium")
        out = frozen(x)
    assert relative_error(out, expected) < (2e-2 if BF16 else 1e-5)
    assert torch.equal(out.argmax(1), expected.argmax(1))


def test_freeze_under_medium(precision):
    """freeze() called with "medium" already set: its self-check of the trace runs in float32
    (under "medium" the graph reads bfloat16 weight copies that the model does not), and the
    setting is kept."""
    torch.manual_seed(0)
    model = randomise_bn(ghostnet_050()).eval()
    x = torch.randn(1, 3, 64, 64)
    precision("medium")
    frozen = ghostkernels.freeze(ghostkernels.accelerate(model), x)
    assert torch.get_float32_matmul_precision() == "medium"
    with torch.no_grad():
        assert relative_error(frozen(x), model(x)) < (2e-2 if BF16 else 1e-5)


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, "matmul"), reason="torch < 2.9 has no fp32_precision API")
@pytest.mark.parametrize("setting, bfloat16", [
    ("torch.backends.mkldnn.matmul.fp32_precision = 'bf16'", True),
    ("torch.backends.fp32_precision = 'bf16'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", False),  # what GPU training scripts set
    ("torch.backends.mkldnn.matmul.fp32_precision = 'ieee'", False)])
def test_fp32_precision_api(setting, bfloat16):
    """torch >= 2.9's successor of set_float32_matmul_precision: once a script uses it, reading the
    legacy setting raises, and every kernel call, backends() and freeze() raised with it. Now its
    mkldnn matmul precision is the bfloat16 mode's switch, as it is PyTorch's, and freeze() leaves
    it as it was. In a subprocess: the API cannot be unset."""
    script = f"""
import torch, ghostkernels
import torch.nn.functional as F
from ghostkernels.models import ghostnet_050
{setting}
x, weight, bias = torch.randn(2, 80, 14, 14), torch.randn(112, 80, 1, 1) / 9, torch.randn(112)
out = torch.ops.ghostkernels.pointwise_conv2d(x, weight, bias)
operands = (x.bfloat16(), weight.bfloat16()) if {bfloat16} and {BF16} else (x, weight)
expected = F.conv2d(operands[0].double(), operands[1].double(), bias.double())
error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
assert error < 1e-5, error
status = ghostkernels.backends()["cpu"]["bfloat16_matmul"]
assert status.startswith({"on:" if bfloat16 else "off:"!r} if {BF16} else "unavailable:"), status
assert ghostkernels._backends.bf16_matmuls_requested() is {bfloat16}
settings = (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
model = ghostnet_050().eval()
image = torch.randn(1, 3, 64, 64)
frozen = ghostkernels.freeze(ghostkernels.accelerate(model), image)
assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == settings
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_frozen_weight_copies_go_with_the_weight(precision):
    precision("medium")
    x = torch.randn(1, 64, 1, 1)
    (weight,) = frozen_copy(torch.randn(32, 64, 1, 1))
    marked, copied = ops.frozen_weights_status()
    ops.pointwise_conv2d(x, weight, None)
    # rows padded to a multiple of 32 elements, 16 zero rows after the last (whole AMX tiles)
    assert ops.frozen_weights_status() == (marked, copied + ((32 + 16) * 64 * 2 if BF16 else 0))
    del weight
    ops.mark_frozen_weights([])  # sweeps the entries of weights that are gone
    assert ops.frozen_weights_status() == (marked - 1, copied)


@pytest.mark.parametrize("inp, oup, size, batch", [
    (64, 40, (7, 7), 1),     # 20 channels, 49 pixels: the scale in B's pairs and in the dot-product column
    (96, 40, (14, 14), 2),   # two images, two scales
    (160, 240, (7, 7), 4),   # 120 channels, more than the pixels (elsewhere x * scale is packed first)
])
def test_se_scale_in_the_rounded_pairs(precision, inp, oup, size, batch):
    """On the dot products an SE scale multiplies x's rows as they are rounded to bfloat16 pairs (W1
    stays a frozen weight's copy): ghost_module_scaled is ghost_module on x * scale, bit for bit."""
    if not BF16 or AMX:
        pytest.skip("the dot-product engine only (test_dot_product_engine reruns this file on it)")
    w1, b1, w2, b2 = weights(inp, oup)
    (frozen_w1,) = frozen_copy(w1)
    x, scale = torch.randn(batch, inp, *size), torch.rand(batch, inp, 1, 1)
    args = (b1, w2, b2, oup, 1, "relu")
    precision("medium")
    expected = ops.ghost_module(x * scale, w1, *args)
    assert torch.equal(ops.ghost_module_scaled(x, scale, w1, *args), expected)
    assert torch.equal(ops.ghost_module_scaled(x, scale, frozen_w1, *args), expected)


@pytest.mark.parametrize("inp, oup, size", [(40, 51, (14, 14)), (300, 37, (5, 5)), (160, 960, (7, 7))])
def test_frozen_primary_weights(precision, inp, oup, size):
    """The bfloat16 GEMMs read a frozen W1 (or 1x1 weight) from its bfloat16 copy instead of rounding
    it per call: the same bfloat16 operands, so the same outputs bit for bit, with W1's rows
    split across work items at any offset, and with an SE scale folded into x or into W1."""
    torch.manual_seed(0)
    w1, b1, w2, b2 = weights(inp, oup)
    (frozen_w1,) = frozen_copy(w1)
    precision("medium")
    copied = ops.frozen_weights_status()[1]
    for batch, stride in ((1, 1), (2, 2)):
        x = torch.randn(batch, inp, *size)
        args = (b1, w2, b2, oup, stride, "relu")
        assert torch.equal(ops.ghost_module(x, frozen_w1, *args), ops.ghost_module(x, w1, *args))
        scale = torch.rand(batch, inp, 1, 1)
        assert torch.equal(ops.ghost_module_scaled(x, scale, frozen_w1, *args),
                           ops.ghost_module_scaled(x, scale, w1, *args))
        w3, b3 = torch.randn(oup, 1, 3, 3), torch.randn(oup)
        assert torch.equal(ops.ghost_module_depthwise(x, frozen_w1, *args, w3, b3, 2),
                           ops.ghost_module_depthwise(x, w1, *args, w3, b3, 2))
    if BF16:  # the copy was made, and read
        assert ops.frozen_weights_status()[1] == copied + (w1.shape[0] + 16) * (-(-inp // 32) * 32) * 2
    x = torch.randn(2, inp, *size)
    weight, bias = torch.randn(oup, inp, 1, 1) / inp ** 0.5, torch.randn(oup)
    (frozen,) = frozen_copy(weight)
    assert torch.equal(ops.pointwise_conv2d(x, frozen, bias), ops.pointwise_conv2d(x, weight, bias))
    assert torch.equal(ops.pointwise_conv2d_pool(x, frozen, bias, "relu"),
                       ops.pointwise_conv2d_pool(x, weight, bias, "relu"))
