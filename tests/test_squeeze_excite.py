"""ghostkernels::ghost_module_scaled (an SE product folded into the Ghost op) and its merge into
GhostBottleneck-style blocks of the original code, timm and the zoo."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostkernels import accelerate, ghost_module_reference, squeeze_excite
from ghostkernels.squeeze_excite import SqueezeExciteGhost

from conftest import BAD_ARGUMENT, intra_op_threads, make_input, make_weights, needs_triton_kernels, randomise_bn
from test_models import TimmGhostModule

op = torch.ops.ghostkernels.ghost_module_scaled


# (inp, oup, ratio, dw, kernel, stride, size)
CONFIGS = [(12, 9, 2, 3, 1, 1, (7, 7)), (5, 13, 3, 5, 1, 2, (9, 11)), (6, 8, 4, 1, 3, 1, (12, 14)),
           (16, 24, 2, 3, 1, 1, (37, 70)), (3, 4, 2, 7, 1, 1, (2, 1))]


@pytest.mark.parametrize("config, activation, channels_last, batch",
                         list(itertools.product(CONFIGS, ["relu", "none"], [False, True], [2, 1])))
def test_matches_reference(config, activation, channels_last, batch):
    inp, oup, ratio, dw, kernel, stride, size = config
    x = make_input(batch, inp, *size, channels_last=channels_last)
    scale = torch.rand(batch, inp, 1, 1, dtype=torch.float64)
    weights = make_weights(inp, oup, ratio, dw, kernel)
    out = op(x, scale, *weights, oup, stride, activation)
    expected = ghost_module_reference(x * scale, *weights, out_channels=oup, stride=stride, activation=activation)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_float32_and_empty_batch(threads):
    """threads: the images and channels split over intra-op threads, evenly or not."""
    x, scale = torch.randn(3, 20, 14, 14), torch.rand(3, 20, 1, 1)
    weights = make_weights(20, 30, 2, 3, dtype=torch.float32)
    expected = ghost_module_reference(x * scale, *weights, out_channels=30)
    with intra_op_threads(threads):
        torch.testing.assert_close(op(x, scale, *weights, 30, 1, "relu"), expected, rtol=1e-5, atol=1e-5)
    assert op(x[:0], scale[:0], *weights, 30, 1, "relu").shape == (0, 30, 14, 14)


def test_gradcheck_and_opcheck():
    x = make_input(2, 4, 5, 6, requires_grad=True)
    scale = torch.rand(2, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    args = (x, scale, *make_weights(4, 6, 2, 3, requires_grad=True), 6, 1, "relu")
    assert torch.autograd.gradcheck(op, args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("scale, message", [(torch.rand(2, 4), "scale must be"), (torch.rand(1, 4, 1, 1), "scale must be"),
                                            (torch.rand(2, 4, 1, 1, dtype=torch.float32), "dtype")])
def test_bad_scale(scale, message):
    x = make_input(2, 4, 5, 6)
    with pytest.raises(BAD_ARGUMENT, match=message):
        op(x, scale, *make_weights(4, 6, 2, 3), 6, 1, "relu")


class TimmSqueezeExcite(nn.Module):
    """timm's SqueezeExcite as GhostNet builds it: a `gate` module."""

    def __init__(self, chs, rd):
        super().__init__()
        self.conv_reduce, self.act1 = nn.Conv2d(chs, rd, 1), nn.ReLU(inplace=True)
        self.conv_expand, self.gate = nn.Conv2d(rd, chs, 1), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class OriginalSqueezeExcite(nn.Module):
    """The Huawei code's SqueezeExcite: avg_pool and a `gate_fn` function."""

    def __init__(self, chs, rd):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce, self.act1 = nn.Conv2d(chs, rd, 1), nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, chs, 1)
        self.gate_fn = lambda t: F.relu6(t + 3.0) / 6.0

    def forward(self, x):
        return x * self.gate_fn(self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x)))))


class Bottleneck(nn.Module):
    """ghost1 -> se -> ghost2, shortcut added in place (the original code and timm)."""

    def __init__(self, se_class, chs=8, mid_chs=16):
        super().__init__()
        self.ghost1 = TimmGhostModule(chs, mid_chs)
        self.se = se_class(mid_chs, 4)
        self.ghost2 = TimmGhostModule(mid_chs, chs, act_layer=nn.Identity)

    def forward(self, x):
        shortcut = x
        x = self.ghost2(self.se(self.ghost1(x)))
        x += shortcut
        return x


@pytest.mark.parametrize("se_class", [TimmSqueezeExcite, OriginalSqueezeExcite])
def test_accelerate_merges_se_into_ghost2(se_class):
    net = randomise_bn(Bottleneck(se_class), spread=0.2).eval()
    fast = accelerate(net)
    assert fast.acceleration_summary.merged == ["se+ghost2"]
    assert isinstance(fast.ghost2, SqueezeExciteGhost) and isinstance(fast.se, nn.Identity)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    out, fast_out = net(x), fast(x)
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)
    # eval-mode gradients go through the recomputing backward, past the in-place residual
    for a, b in zip(torch.autograd.grad(fast_out.square().sum(), x), torch.autograd.grad(out.square().sum(), x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.to(memory_format=torch.channels_last)), out, rtol=1e-5, atol=1e-5)


def test_replaced_parts_are_compared_by_identity():
    """SqueezeExciteGhost notices a replaced SE part by identity, never by the parts' __eq__: a
    tuple's != calls it, which torch 2.7's dynamo cannot trace for a module (compile and export of
    every accelerated GhostNet with SE failed there)."""
    class ReLUWithoutEquality(nn.ReLU):
        __hash__ = nn.ReLU.__hash__

        def __eq__(self, other):
            raise AssertionError("a part compared with ==")

    net = randomise_bn(Bottleneck(TimmSqueezeExcite), spread=0.2).eval()
    fast = accelerate(net)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        fast(x)
        fast.ghost2.se.act1 = ReLUWithoutEquality()  # not nn.ReLU itself: the SE now runs as written
        assert not fast.ghost2.standard_gate
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


def test_other_squeeze_excites_stay():
    class SEModule(TimmSqueezeExcite):  # another name: its forward may differ (timm's SEModule has fc1/fc2)
        pass

    net = Bottleneck(SEModule).eval()
    assert not accelerate(net).acceleration_summary.merged
    assert not SqueezeExciteGhost.eligible(TimmSqueezeExcite(16, 4), nn.Conv2d(16, 8, 1))


def test_zoo_merges_every_se_block():
    from ghostkernels.models import ghostnet_050
    fast = accelerate(ghostnet_050(num_classes=10, fused=False).eval())
    se_merges = [name for name in fast.acceleration_summary.merged if name.endswith("se+ghost2")]
    assert se_merges == ["blocks.3.0.se+ghost2", "blocks.4.0.se+ghost2", "blocks.6.3.se+ghost2",
                         "blocks.6.4.se+ghost2", "blocks.7.0.se+ghost2", "blocks.8.1.se+ghost2",
                         "blocks.8.3.se+ghost2"]


@pytest.mark.parametrize("activation, channels_last", list(itertools.product(["relu", "none"], [False, True])))
def test_nan_propagates_like_the_reference(activation, channels_last):
    """relu(nan) is nan in the ghost channels too (NCHW made it 0), with the scale folded into W1."""
    x = make_input(2, 5, 7, 9, channels_last=channels_last)
    x[0, 1, 2, 3] = x[1, :, -1, -1] = float("nan")
    scale = torch.rand(2, 5, 1, 1, dtype=torch.float64)
    weights = make_weights(5, 9, 3, 3)
    weights[2][1, 0, 1, 1] = float("nan")
    out = op(x, scale, *weights, 9, 1, activation)
    expected = ghost_module_reference(x * scale, *weights, out_channels=9, activation=activation)
    assert expected.isnan().any() and not expected.isnan().all()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_no_input_channels_is_an_error():
    x, scale = torch.randn(2, 0, 5, 6, dtype=torch.float64), torch.rand(2, 0, 1, 1, dtype=torch.float64)
    w1, b1, w2, b2 = make_weights(1, 6, 2, 3)
    with pytest.raises(BAD_ARGUMENT, match="primary_weight must have at least one input channel"):
        op(x, scale, w1[:, :0], b1, w2, b2, 6, 1, "relu")


gate_op = torch.ops.ghostkernels.squeeze_excite_gate


def gate_weights(channels, reduced, dtype=torch.float64, bias=True):
    return (torch.randn(reduced, channels, 1, 1, dtype=dtype), torch.randn(reduced, dtype=dtype) if bias else None,
            torch.randn(channels, reduced, 1, 1, dtype=dtype), torch.randn(channels, dtype=dtype) if bias else None)


def gate_expected(x, w1, b1, w2, b2):
    hidden = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), w1, b1))
    return F.relu6(F.conv2d(hidden, w2, b2) + 3.0) / 6.0


@pytest.mark.parametrize("batch, channels_last, bias, size",
                         list(itertools.product([0, 1, 7], [False, True], [True, False], [(7, 7), (1, 1), (37, 70)])))
def test_gate_matches_reference(batch, channels_last, bias, size):
    """7 images: the GEMVs' tiles of 4, 2 and 1 image (gemm.h dot_rows); 6 rows: one of 4, two alone."""
    x = make_input(batch, 24, *size, channels_last=channels_last)
    weights = gate_weights(24, 6, bias=bias)
    gate = gate_op(x, *weights)
    assert gate.shape == (batch, 24, 1, 1)
    torch.testing.assert_close(gate, gate_expected(x, *weights), rtol=1e-12, atol=1e-12)


def test_gate_float32_gradcheck_and_opcheck():
    x = torch.randn(2, 40, 14, 14)
    weights = gate_weights(40, 12, dtype=torch.float32)
    torch.testing.assert_close(gate_op(x, *weights), gate_expected(x, *weights), rtol=1e-5, atol=1e-5)
    x = make_input(2, 6, 3, 4, requires_grad=True)
    args = (x, *(t.requires_grad_() for t in gate_weights(6, 3)))
    assert torch.autograd.gradcheck(gate_op, args)
    torch.library.opcheck(gate_op, args)


@pytest.mark.parametrize("index, bad, message", [
    (0, torch.randn(6, 24, 3, 3, dtype=torch.float64), "reduce_weight must be"),
    (2, torch.randn(24, 5, 1, 1, dtype=torch.float64), "expand_weight must be"),
    (1, torch.randn(5, dtype=torch.float64), "reduce_bias must have shape"),
    (3, torch.randn(24, dtype=torch.float32), "dtype"),
])
def test_gate_bad_arguments(index, bad, message):
    weights = list(gate_weights(24, 6))
    weights[index] = bad
    with pytest.raises(BAD_ARGUMENT, match=message):
        gate_op(make_input(1, 24, 5, 5), *weights)
    with pytest.raises(BAD_ARGUMENT, match="4-D"):
        gate_op(torch.randn(24, 5, 5, dtype=torch.float64), *gate_weights(24, 6))


def test_non_hard_sigmoid_gate_runs_as_written():
    class SigmoidSqueezeExcite(TimmSqueezeExcite):
        def __init__(self, chs, rd):
            super().__init__(chs, rd)
            self.gate = nn.Sigmoid()

    net = randomise_bn(Bottleneck(SigmoidSqueezeExcite), spread=0.2).eval()
    fast = accelerate(net)
    assert fast.acceleration_summary.merged == ["se+ghost2"] and not fast.ghost2.standard_gate
    assert accelerate(Bottleneck(TimmSqueezeExcite).eval()).ghost2.standard_gate
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels, reduced", [(0, 3), (4, 0)])
def test_gate_zero_channels_is_an_error(channels, reduced):
    """The composed gate's F.conv2d rejects them too (and returns no channels for no inputs)."""
    x = make_input(2, channels, 4, 5)
    with pytest.raises(BAD_ARGUMENT, match="squeeze_excite_gate: x and reduce_weight must have at least one"):
        gate_op(x, *gate_weights(channels, reduced))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_nan_propagates_like_the_reference(channels_last):
    x = make_input(3, 24, 5, 5, channels_last=channels_last)
    x[0, 1, 2, 3] = float("nan")
    weights = gate_weights(24, 6)
    weights[2][5, 2, 0, 0] = float("nan")
    expected = gate_expected(x, *weights)
    assert expected.isnan().any() and not expected.isnan().all()
    torch.testing.assert_close(gate_op(x, *weights), expected, rtol=1e-12, atol=1e-12, equal_nan=True)


# The Triton gate (the op's CUDA kernel), on a GPU when there is one, else in the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, channels, reduced, size, channels_last, bias", [
    (3, 24, 6, (7, 7), False, True), (1, 40, 12, (1, 1), True, False), (2, 7, 5, (37, 70), True, True),
    (0, 24, 6, (5, 5), False, True), (1, 200, 300, (3, 2), False, True)])
def test_triton_gate_matches_reference(batch, channels, reduced, size, channels_last, bias, dtype):
    from ghostkernels import triton_squeeze_excite
    x = make_input(batch, channels, *size, channels_last=channels_last, dtype=dtype).to(TRITON_DEVICE)
    weights = [w.to(TRITON_DEVICE) if w is not None else None for w in gate_weights(channels, reduced, dtype, bias)]
    squeeze_excite.check_gate_args(x, *weights)
    gate = triton_squeeze_excite.squeeze_excite_gate(x, *weights)
    expected = gate_expected(x.double(), *(w.double() if w is not None else None for w in weights))
    assert gate.shape == (batch, channels, 1, 1) and gate.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(gate.double(), expected, rtol=tol, atol=tol)


@needs_triton_kernels
def test_triton_gate_keeps_nan_and_checks_its_arguments():
    from ghostkernels import triton_squeeze_excite
    x = make_input(2, 24, 5, 5).to(TRITON_DEVICE)
    x[0, 1, 2, 3] = float("nan")
    weights = [w.to(TRITON_DEVICE) for w in gate_weights(24, 6)]
    torch.testing.assert_close(triton_squeeze_excite.squeeze_excite_gate(x, *weights), gate_expected(x, *weights),
                               rtol=1e-12, atol=1e-12, equal_nan=True)
    bad = [(0, weights[0][:, :5], ValueError, "reduce_weight must be"), (2, weights[2][:, :5], ValueError,
           "expand_weight must be"), (3, weights[3].float(), TypeError, "expand_bias is torch.float32")]
    for index, value, error, message in bad:
        args = list(weights)
        args[index] = value
        with pytest.raises(error, match=message):
            squeeze_excite.check_gate_args(x, *args)
