"""ghostkernels::ghost_module_depthwise (ghost1 + folded conv_dw as one op) against the reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ghostkernels import accelerate, ghost_module_reference
from ghostkernels import ghost_depthwise
from ghostkernels.direct_conv import DirectConv2d
from ghostkernels.ghost_depthwise import GhostDepthwise
from ghostkernels.modules import GhostModule

from conftest import BAD_ARGUMENT, make_input, make_weights

op = torch.ops.ghostkernels.ghost_module_depthwise


def expected(x, weights, oup, stride, activation, depthwise_weight, depthwise_bias, depthwise_stride):
    ghost = ghost_module_reference(x, *weights, out_channels=oup, stride=stride, activation=activation)
    k = depthwise_weight.shape[-1]
    return F.conv2d(ghost, depthwise_weight, depthwise_bias, depthwise_stride, k // 2, groups=oup)


def depthwise_weights(oup, k, dtype=torch.float64, bias=True):
    return torch.randn(oup, 1, k, k, dtype=dtype) / k, torch.randn(oup, dtype=dtype) if bias else None


# (inp, oup, ratio, dw, size): GhostNet's stride-2 shapes scaled down, odd oup, ratio 3-4, dw 1-7,
# (37, 70): several bands of the depthwise conv and a partial last one
CONFIGS = [(16, 48, 2, 3, (37, 70)), (5, 13, 3, 5, (9, 11)), (6, 9, 4, 7, (12, 14)), (7, 10, 2, 1, (2, 1))]


@pytest.mark.parametrize("config, k, depthwise_stride, activation, channels_last, bias",
                         list(itertools.product(CONFIGS, [3, 5], [2, 1], ["relu", "none"], [False, True],
                                                [True, False])))
def test_matches_reference(config, k, depthwise_stride, activation, channels_last, bias):
    inp, oup, ratio, dw, size = config
    x = make_input(2, inp, *size, channels_last=channels_last)
    weights = make_weights(inp, oup, ratio, dw, bias=bias)
    w3, b3 = depthwise_weights(oup, k, bias=bias)
    out = op(x, *weights, oup, 1, activation, w3, b3, depthwise_stride)
    torch.testing.assert_close(out, expected(x, weights, oup, 1, activation, w3, b3, depthwise_stride),
                               rtol=1e-12, atol=1e-12)


# float32 at stride 2 with the channels in lanes (csrc/depthwise_lanes.h): 40 Ghost channels (two
# whole vectors of lanes and a partial one), 33 (odd oup: the last ghost dropped), planes 14 and 56
# wide, and 300 rows high in several bands; 112 wide with 3x3 taps and stride 1 take the phase split.
@pytest.mark.parametrize("oup, ratio", [(40, 2), (33, 3)])
@pytest.mark.parametrize("k, depthwise_stride", [(3, 2), (5, 2), (5, 1)])
@pytest.mark.parametrize("size", [(14, 14), (20, 56), (300, 20), (9, 112)])
def test_float32_channels_in_lanes(oup, ratio, k, depthwise_stride, size):
    x = torch.randn(2, 12, *size)
    weights = make_weights(12, oup, ratio, 3, dtype=torch.float32)
    w3, b3 = depthwise_weights(oup, k, dtype=torch.float32)
    out = op(x, *weights, oup, 1, "relu", w3, b3, depthwise_stride)
    torch.testing.assert_close(out, expected(x, weights, oup, 1, "relu", w3, b3, depthwise_stride),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [0, 1])
def test_float32_primary_stride_and_batch(batch):
    x = torch.randn(batch, 6, 23, 19)
    weights = make_weights(6, 12, 2, 3, dtype=torch.float32)
    w3, b3 = depthwise_weights(12, 5, dtype=torch.float32)
    out = op(x, *weights, 12, 2, "relu", w3, b3, 2)
    torch.testing.assert_close(out, expected(x, weights, 12, 2, "relu", w3, b3, 2), rtol=1e-5, atol=1e-5)


def test_gradcheck_and_opcheck():
    x = make_input(1, 4, 7, 6, requires_grad=True)
    weights = make_weights(4, 6, 2, 3, requires_grad=True)
    w3, b3 = (t.requires_grad_() for t in depthwise_weights(6, 3))
    args = (x, *weights, 6, 1, "relu", w3, b3, 2)
    assert torch.autograd.gradcheck(op, args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("weights_channels_last", [False, True])
def test_every_path_has_the_fake_kernels_strides(channels_last, weights_channels_last):
    """torch.compile trusts the fake kernel's strides: the composition (the op on CUDA and
    without the C++ library) once returned NCHW for a channels_last x, and compiled GhostNets on
    a GPU failed their stride assertion. A model moved to channels_last has such weights too,
    and the library conv's output follows them."""
    x = make_input(2, 5, 9, 11, channels_last=channels_last)
    weights = make_weights(5, 12, 2, 3)
    w3, b3 = depthwise_weights(12, 3)
    if weights_channels_last:
        w3 = w3.to(memory_format=torch.channels_last)
    args = (x, *weights, 12, 1, "relu", w3, b3, 2)
    with FakeTensorMode() as mode:
        fake = ghost_depthwise._fake(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for out in (op(*args), ghost_depthwise._composed(*args)):
        assert out.shape == fake.shape and out.stride() == fake.stride()


F64 = torch.float64


@pytest.mark.parametrize("weight, bias, stride, message", [
    (torch.randn(6, 1, 4, 4, dtype=F64), None, 2, "depthwise_weight must be"),
    (torch.randn(5, 1, 3, 3, dtype=F64), None, 2, "depthwise_weight must be"),
    (torch.randn(6, 1, 3, 3, dtype=F64), torch.randn(5, dtype=F64), 2, "depthwise_bias must have shape"),
    (torch.randn(6, 1, 3, 3, dtype=torch.float32), None, 2, "must match x's dtype"),
    (torch.randn(6, 1, 3, 3, dtype=F64), None, 3, "depthwise_stride must be 1 or 2"),
])
def test_bad_depthwise_arguments(weight, bias, stride, message):
    x = make_input(1, 4, 8, 8)
    with pytest.raises(BAD_ARGUMENT, match=message):
        op(x, *make_weights(4, 6, 2, 3), 6, 1, "relu", weight, bias, stride)


@pytest.mark.parametrize("activation, channels_last, depthwise_stride",
                         list(itertools.product(["relu", "none"], [False, True], [1, 2])))
def test_nan_propagates_like_the_reference(activation, channels_last, depthwise_stride):
    """relu(nan) is nan in the ghost rows the depthwise conv reads (NCHW made it 0)."""
    x = make_input(2, 5, 9, 11, channels_last=channels_last)
    x[0, 1, 2, 3] = x[1, :, -1, -1] = float("nan")
    weights = make_weights(5, 9, 3, 3)
    weights[2][1, 0, 1, 1] = float("nan")
    w3, b3 = depthwise_weights(9, 3)
    out = op(x, *weights, 9, 1, activation, w3, b3, depthwise_stride)
    reference = expected(x, weights, 9, 1, activation, w3, b3, depthwise_stride)
    assert reference.isnan().any() and not reference.isnan().all()
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("x_shape, w1_shape, stride, message", [
    ((1, 0, 8, 8), (6, 0, 1, 1), 1, "primary_weight must have at least one input channel"),
    ((1, 4, 0, 8), (6, 4, 1, 1), 2, "too small"),
])
def test_empty_inputs_are_an_error(x_shape, w1_shape, stride, message):
    """No input channels gave zeros; an empty plane at stride 2 one row read from nowhere."""
    _, b1, w2, b2 = make_weights(1, 12, 2, 3)
    with pytest.raises(BAD_ARGUMENT, match=message):
        op(torch.randn(x_shape, dtype=F64), torch.randn(w1_shape, dtype=F64), b1, w2, b2, 12, stride, "relu",
           *depthwise_weights(12, 3), 2)


def test_module_eval_grad_and_training():
    ghost = GhostModule(8, 12).eval()
    for bn in (ghost.primary_conv[1], ghost.cheap_operation[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    conv = nn.Conv2d(12, 12, 5, 2, 2, groups=12)
    merged = GhostDepthwise(ghost, DirectConv2d.from_conv(conv))
    assert not merged.training and GhostDepthwise.eligible(ghost, merged.depthwise)
    x = torch.randn(2, 8, 13, 16, requires_grad=True)
    out = merged(x)
    reference = conv(ghost(x))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, merged.depthwise.weight])
    for got, want in zip(grads, torch.autograd.grad(reference.square().sum(), [x, conv.weight])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(merged(x.to(memory_format=torch.channels_last)), reference, rtol=1e-5, atol=1e-5)
    merged.train()
    out = merged(x)  # training: the two modules in turn, batch statistics
    torch.testing.assert_close(out, merged.depthwise(ghost(x)))
    with pytest.raises(ValueError, match="4-D"):
        merged.eval()(torch.randn(8, 13, 16))


def test_accelerate_merges_stride_two_blocks():
    from ghostkernels.models import ghostnet_050
    model = ghostnet_050(num_classes=10, fused=False).eval()
    fast = accelerate(model)
    merged = [name for name in fast.acceleration_summary.merged if name.endswith("ghost1+conv_dw")]
    assert merged == [f"blocks.{i}.0.ghost1+conv_dw" for i in (1, 3, 5, 7)]
    assert isinstance(fast.blocks[1][0].ghost1, GhostDepthwise) and isinstance(fast.blocks[1][0].conv_dw, nn.Identity)
    assert "11 depthwise convs / SE blocks merged into Ghost ops" in str(fast.acceleration_summary)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
