"""ghostkernels::direct_conv2d (folded conv_dw, shortcut and stem convs) against F.conv2d."""

import itertools
import pickle
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import ghostkernels
from ghostkernels import direct_conv, models
from ghostkernels.models import g_ghost_regnet
from ghostkernels.direct_conv import DepthwiseConv2d, DirectConv2d
from ghostkernels.reference import output_memory_format

from conftest import BAD_ARGUMENT, frozen_node_kinds, intra_op_threads, make_input, make_weights, randomise_bn


# (12, 14): even rows shorter than a vector pair; (37, 70): rows split one by one, several L1 bands
# odd and even widths; stride-2 rows written as whole vectors with their padding (14, 28 and 40
# wide: one to three vectors in float32 and float64), in one band and, 700 rows high, in several
# (those vectors must stay inside their band); 70 wide: the copy loops
SIZES = [(9, 11), (2, 1), (12, 14), (11, 28), (9, 40), (700, 10), (37, 70)]


@pytest.mark.parametrize("k, stride, channels_last, bias, size",
                         list(itertools.product([1, 3, 5, 7], [1, 2], [False, True], [True, False], SIZES)))
def test_depthwise_matches_conv2d(k, stride, channels_last, bias, size):
    x = make_input(2, 5, *size, channels_last=channels_last)
    weight = torch.randn(5, 1, k, k, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if bias else None
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, b, stride)
    torch.testing.assert_close(out, F.conv2d(x, weight, b, stride, k // 2, groups=5), rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()  # as the fake kernel promises, channels_last input too


# (in, out, groups): the stem (3 -> 16), a grouped conv, one past the kernel's 4 inputs per group
@pytest.mark.parametrize("channels", [(3, 16, 1), (4, 6, 2), (1, 3, 1), (8, 5, 1)])
@pytest.mark.parametrize("k, stride, size", [(3, 2, (37, 70)), (3, 2, (9, 11)), (5, 1, (12, 14)), (1, 2, (6, 7))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])  # cl: made NCHW for the kernel
def test_few_input_channels_match_conv2d(channels, k, stride, size, bias, channels_last):
    inp, out_channels, groups = channels
    x = make_input(2, inp, *size, channels_last=channels_last)
    weight = torch.randn(out_channels, inp // groups, k, k, dtype=torch.float64)
    b = torch.randn(out_channels, dtype=torch.float64) if bias else None
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, b, stride)
    expected = F.conv2d(x, weight, b, stride, k // 2, groups=groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


# (in, out, groups): RegNetX's grouped convs (G-GhostNet: groups of 36 and 48 inputs), 5 inputs a
# group (one past the direct kernel's), out != in, the most inputs the shifted GEMMs take; planes
# of one pixel, one row, one column, odd and even sides (stride 2: phases of unequal sizes), rows
# of one to two vectors (split by half vectors: 7 float64s), and wider than a tile of columns
@pytest.mark.parametrize("channels", [(72, 72, 2), (10, 14, 2), (128, 64, 2), (12, 6, 2)])
@pytest.mark.parametrize("k, size", [(3, (14, 14)), (3, (1, 1)), (5, (1, 9)), (1, (7, 3)), (3, (5, 37)), (7, (8, 11)),
                                     (3, (6, 7))])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias, activation", [(True, "none"), (False, "relu")])
def test_grouped_matches_conv2d(channels, k, size, stride, bias, activation):
    """Grouped convs on shifted GEMMs (more than 4 inputs a group; stride 2 on parity phases)."""
    inp, out_channels, groups = channels
    x = make_input(2, inp, *size)
    weight = torch.randn(out_channels, inp // groups, k, k, dtype=torch.float64)
    b = torch.randn(out_channels, dtype=torch.float64) if bias else None
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, b, stride, activation)
    expected = F.conv2d(x, weight, b, stride, k // 2, groups=groups)
    torch.testing.assert_close(out, expected.relu() if activation == "relu" else expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch, threads", [(0, 1), (1, 1), (1, 2), (3, 2), (1, 3)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(14, 14), (9, 13)])
def test_grouped_float32(batch, threads, stride, size):
    x, weight, bias = torch.randn(batch, 216, *size), torch.randn(216, 36, 3, 3) / 18, torch.randn(216)
    with intra_op_threads(threads):
        out = torch.ops.ghostkernels.direct_conv2d(x, weight, bias, stride, "relu")
    expected = F.conv2d(x, weight, bias, stride, 1, groups=6).relu()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_float32(size):
    x, weight = torch.randn(3, 6, *size), torch.randn(6, 1, 5, 5)
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, None, 2)
    torch.testing.assert_close(out, F.conv2d(x, weight, None, 2, 2, groups=6), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    out = torch.ops.ghostkernels.direct_conv2d(torch.randn(0, 4, 8, 8), torch.randn(4, 1, 3, 3), None, 2)
    assert out.shape == (0, 4, 4, 4)


@pytest.mark.parametrize("conv", [torch.nn.Conv2d(8, 8, 5, 2, 2, groups=8), torch.nn.Conv2d(3, 16, 3, 2, 1)],
                         ids=["depthwise", "stem"])
def test_float32_and_module(conv):
    module = DirectConv2d.from_conv(conv)
    x = torch.randn(3, conv.in_channels, 15, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), rtol=1e-5, atol=1e-5)
    assert DirectConv2d.eligible(conv)


def test_eligible():
    assert not DirectConv2d.eligible(torch.nn.Conv2d(8, 8, 3, padding=1))  # 8 inputs per group
    assert DirectConv2d.eligible(torch.nn.Conv2d(96, 96, 3, padding=1, groups=2))  # grouped, stride 1
    assert DirectConv2d.eligible(torch.nn.Conv2d(96, 96, 3, 2, padding=1, groups=2))  # grouped, stride 2
    assert not DirectConv2d.eligible(torch.nn.Conv2d(130, 130, 3, padding=1, groups=2))  # 65 inputs per group
    assert not DirectConv2d.eligible(torch.nn.Conv2d(3, 16, 3, padding=0))  # not 'same'
    assert not DirectConv2d.eligible(torch.nn.Conv2d(3, 16, 3, stride=3, padding=1))


@pytest.mark.parametrize("weight_shape", [(3, 1, 3, 3), (4, 3, 3, 3)], ids=["depthwise", "dense"])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_gradcheck_and_opcheck(weight_shape, activation):
    x = make_input(1, 3, 6, 5, requires_grad=True)
    weight = torch.randn(*weight_shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(weight_shape[0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.ghostkernels.direct_conv2d(*a, 2, activation),
                                    (x, weight, bias))
    torch.library.opcheck(torch.ops.ghostkernels.direct_conv2d.default, (x, weight, bias, 2, activation))


# Each path of the kernel with the ReLU applied as it stores: the phase split (depthwise, 5
# channels; the stem, 3 -> 16), the lanes (16 and 17 channels, stride 1 and 2), and the convs it
# hands to at::conv2d (8 inputs per group, channels_last input).
@pytest.mark.parametrize("channels, k, stride, size, channels_last", [
    ((5, 5, 5), 3, 1, (9, 11), False), ((5, 5, 5), 5, 2, (37, 70), False), ((3, 16, 1), 3, 2, (37, 70), False),
    ((16, 16, 16), 3, 2, (14, 14), False), ((17, 17, 17), 5, 1, (9, 28), False), ((8, 5, 1), 3, 1, (6, 7), False),
    ((5, 5, 5), 3, 2, (9, 11), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_matches_conv2d(channels, k, stride, size, channels_last, dtype):
    inp, out_channels, groups = channels
    x = make_input(2, inp, *size, channels_last=channels_last, dtype=dtype)
    weight, bias = torch.randn(out_channels, inp // groups, k, k, dtype=dtype), torch.randn(out_channels, dtype=dtype)
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, bias, stride, "relu")
    expected = F.relu(F.conv2d(x, weight, bias, stride, k // 2, groups=groups))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    assert out.is_contiguous()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_activation(device):
    x, weight = torch.randn(1, 4, 5, 5, device=device), torch.randn(4, 1, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="direct_conv2d: activation must be 'relu' or 'none', got 'gelu'"):
        torch.ops.ghostkernels.direct_conv2d(x, weight, None, 1, "gelu")


class _StemThenReLU(torch.nn.Module):
    """A 3-channel conv and a ReLU (in place or not), the conv's output read elsewhere too when
    `reread`: fusing would then change what the other reader sees."""

    def __init__(self, inplace, reread):
        super().__init__()
        self.conv = DirectConv2d.from_conv(torch.nn.Conv2d(3, 8, 3, 2, 1))
        self.relu = torch.nn.ReLU(inplace=inplace)
        self.reread = reread

    def forward(self, x):
        y = self.conv(x)
        return self.relu(y) + y.mean() if self.reread else self.relu(y)


@pytest.mark.filterwarnings("ignore")  # torch.jit's deprecation and tracer warnings
@pytest.mark.parametrize("inplace, reread, fused", [(True, False, True), (False, False, True), (False, True, False)])
def test_freeze_fuses_relu_only_where_it_keeps_the_meaning(inplace, reread, fused):
    kinds = frozen_node_kinds(_StemThenReLU(inplace, reread).eval(), torch.randn(2, 3, 11, 12))
    assert ("aten::relu_" in kinds or "aten::relu" in kinds) != fused


@pytest.mark.filterwarnings("ignore")
def test_freeze_fuses_the_ghostnet_stem_relu():
    frozen = ghostkernels.freeze(ghostkernels.accelerate(models.ghostnet_050().eval()), torch.randn(1, 3, 32, 32))
    nodes = list(frozen.graph.graph.nodes())
    relu_inputs = [node.inputsAt(0).node().kind() for node in nodes if node.kind() in ("aten::relu", "aten::relu_")]
    assert "ghostkernels::direct_conv2d" not in relu_inputs  # act2 after conv_head stays
    assert [node.inputsAt(4).toIValue() for node in nodes if node.kind() == "ghostkernels::direct_conv2d"].count(
        "relu") == 1  # the stem's


@pytest.mark.parametrize("weight_shape", [(4, 1, 2, 2), (5, 2, 3, 3), (4, 3, 3, 3)],
                         ids=["even kernel", "outputs not divisible by groups", "inputs not divisible"])
def test_bad_weight(weight_shape):
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.ghostkernels.direct_conv2d(torch.randn(1, 4, 5, 5), torch.randn(*weight_shape), None, 1)


@pytest.mark.parametrize("channels, weight_shape, groups", [(6, (16, 3, 3, 3), 1), (4, (4, 1, 3, 3), 2),
                                                          (2, (4, 1, 3, 3), 4), (8, (8, 4, 3, 3), 1)],
                         ids=["stem 6 as 2 groups", "depthwise 4 as 2 groups", "depthwise 2 as 4 groups", "grouped"])
def test_channel_count_of_the_given_groups(channels, weight_shape, groups):
    """Without groups the op takes any multiple of weight.shape[1] channels as a grouped conv:
    a 6-channel input of an accelerated GhostNet ran its 3-channel stem as 2 groups and gave logits
    where the original model's conv raises. With groups (the modules pass theirs) the kernel, the
    fake kernel and the fallback raise the same error, naming x."""
    x, weight = torch.randn(1, channels, 5, 5), torch.randn(*weight_shape)
    message = (rf"direct_conv2d: x has {channels} channels, expected groups x weight.shape\[1\] = {groups} x "
               rf"{weight_shape[1]} \(weight \[{', '.join(map(str, weight_shape))}\]\)")
    torch.ops.ghostkernels.direct_conv2d(x, weight, None, 1)  # inferred: runs
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ghostkernels.direct_conv2d(x, weight, None, 1, groups=groups)
    with pytest.raises(RuntimeError, match=message):
        direct_conv._fallback(x, weight, None, 1, groups=groups)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        torch.ops.ghostkernels.direct_conv2d(mode.from_tensor(x), mode.from_tensor(weight), None, 1, groups=groups)
    right = torch.randn(1, groups * weight_shape[1], 5, 5)
    torch.testing.assert_close(torch.ops.ghostkernels.direct_conv2d(right, weight, None, 1, groups=groups),
                               F.conv2d(right, weight, None, 1, 1, groups=groups))


def test_accelerated_and_frozen_models_refuse_a_wrong_channel_count():
    """An accelerated GhostNet (its stem a DirectConv2d) and its frozen graph raise on a 6-channel
    input, as the original model does, instead of running the stem as two groups."""
    model = randomise_bn(models.ghostnet_050(fused=False)).eval()
    fast = ghostkernels.accelerate(model)
    example = torch.randn(1, 3, 32, 32)
    frozen = ghostkernels.freeze(fast, example)
    wrong = torch.randn(1, 6, 32, 32)
    with pytest.raises(RuntimeError, match="expected input.* to have 3 channels"):
        model(wrong)
    for runner in (fast, frozen):
        with torch.no_grad(), pytest.raises(RuntimeError, match="direct_conv2d: x has 6 channels, expected groups x "
                                                                 "weight.shape"):
            runner(wrong)
    torch.testing.assert_close(frozen(example), model(example), rtol=1e-5, atol=1e-5)


def test_module_pickled_without_groups_loads_with_a_warning():
    """A whole accelerated model pickled by ghostkernels 0.1.0 holds DirectConv2d modules without
    `groups`: unpickled, they infer the groups from x as 0.1.0 did, and warn once per module that
    the channel-count check is missing, instead of an AttributeError at the first forward."""
    conv = torch.nn.Conv2d(3, 16, 3, 2, 1, dtype=torch.float64)
    module = DirectConv2d.from_conv(conv)
    state = module.__dict__.copy()  # what 0.1.0 pickled: all but the attribute it lacked
    del state["groups"]
    module.__reduce_ex__ = lambda protocol: (DirectConv2d.__new__, (DirectConv2d,), state)
    old_pickle = pickle.dumps(module)
    with pytest.warns(UserWarning, match="pickled by ghostkernels 0.1.0.*Accelerate the original model again"):
        loaded = pickle.loads(old_pickle)
    assert loaded.groups is None
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), conv(x), rtol=1e-12, atol=1e-12)
    assert pickle.loads(pickle.dumps(DirectConv2d.from_conv(conv))).groups == 1  # today's pickles keep it


@pytest.mark.parametrize("bias", [torch.randn(1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64),
                                  torch.randn(5, dtype=torch.float64)], ids=["short", "2-D", "long"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bias_must_have_one_entry_per_output_channel(bias, channels_last):
    """The kernel read C_out entries of any bias it was given."""
    x = make_input(1, 4, 5, 5, channels_last=channels_last)
    with pytest.raises(RuntimeError, match=r"direct_conv2d: bias must have shape \(4,\)"):
        torch.ops.ghostkernels.direct_conv2d(x, torch.randn(4, 1, 3, 3, dtype=torch.float64), bias, 1)
    module = DirectConv2d(torch.randn(4, 1, 3, 3, dtype=torch.float64), bias, 2, 4)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4,\)"):
        module(x)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=r"bias must have shape \(4,\)"):
        torch.ops.ghostkernels.direct_conv2d(*(mode.from_tensor(t) for t in (x, module.weight, bias)), 2)


@pytest.mark.parametrize("shape, stride", [((1, 2, 0, 5), 2), ((1, 2, 5, 0), 2), ((1, 2, 0, 5), 1)])
def test_empty_plane_is_an_error_as_in_conv2d(shape, stride):
    """F.conv2d rejects an empty plane ('same' padding is smaller than the kernel); the kernel returned
    a row of garbage at stride 2 (C++ truncates (0 - 1) / 2 to 0), its fake kernel no rows."""
    x, weight = torch.randn(shape, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        F.conv2d(x, weight, None, stride, 1, groups=2)
    with pytest.raises(RuntimeError, match=r"direct_conv2d: x must have H, W >= 1"):
        torch.ops.ghostkernels.direct_conv2d(x, weight, None, stride)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=r"direct_conv2d: x must have H, W >= 1"):
        torch.ops.ghostkernels.direct_conv2d(mode.from_tensor(x), mode.from_tensor(weight), None, stride)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 4)])
def test_fake_kernel_shape_matches(size):
    x, weight = torch.randn(2, 3, *size, dtype=torch.float64), torch.randn(3, 1, 3, 3, dtype=torch.float64)
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, None, 2)
    with FakeTensorMode() as mode:
        fake = torch.ops.ghostkernels.direct_conv2d(mode.from_tensor(x), mode.from_tensor(weight), None, 2)
    assert fake.shape == out.shape == F.conv2d(x, weight, None, 2, 1, groups=3).shape


def test_no_input_channels_is_an_error():
    """groups = C / weight.shape[1] = 0 divided C_out (SIGFPE)."""
    with pytest.raises(RuntimeError, match="direct_conv2d: x must have at least one channel"):
        torch.ops.ghostkernels.direct_conv2d(torch.randn(1, 0, 5, 5), torch.randn(0, 1, 3, 3), None, 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [(6, 6, 6), (3, 16, 1)], ids=["depthwise", "stem"])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_nan_stays_where_conv2d_puts_it(channels, stride, activation):
    inp, out_channels, groups = channels
    x = make_input(2, inp, 7, 9)
    x[0, 1, 2, 3] = x[1, :, -1, -1] = float("nan")
    weight = torch.randn(out_channels, inp // groups, 3, 3, dtype=torch.float64)
    weight[2, 0, 1, 1] = float("nan")
    b = torch.randn(out_channels, dtype=torch.float64)
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, b, stride, activation)
    expected = F.conv2d(x, weight, b, stride, 1, groups=groups)
    torch.testing.assert_close(out, F.relu(expected) if activation == "relu" else expected, rtol=1e-12, atol=1e-12,
                               equal_nan=True)


# ghostkernels::pointwise_conv2d (the 1x1 shortcut and head convs), the other conv op accelerate() uses

# 23x23: two equal pixel chunks; 56x56 at batch 1: eight chunks of 400 pixels (a multiple of the
# threads), the last one short; 3 images of 29x31: chunks of whole vectors, with 8 threads the last
# one 3 pixels; 300 inputs: two K blocks of the GEMM; 8 threads on
# 14x14 and 5x5 maps: output-channel blocks, the last one short; 1x1 maps: MKL's GEMV or (AVX2
# build) the dot products, 70 inputs for a vector tail, 33 outputs for a short group of rows, 7
# images for the dots' tiles of 4, 2 and 1 image; one image takes the rows one by one with four
# sums along k (300 inputs: whole steps of four vectors, then single vectors, then a tail); a
# 7x7 map with 300 outputs: the GEMM's 49th column by dot products, rows in blocks of 128 (and on
# AVX-512 the 48 before it one strip three vectors wide); 6x6 (float32) and 4x5 (float64): a strip
# three vectors wide with a column tail, its last rows of B from the panel, 300 inputs in two K blocks
@pytest.mark.parametrize("batch, inp, out, size", [(1, 16, 24, (23, 23)), (3, 300, 37, (5, 5)), (0, 4, 6, (3, 3)),
                                                   (1, 40, 80, (14, 14)), (2, 7, 5, (1, 9)), (7, 70, 33, (1, 1)),
                                                   (1, 300, 37, (1, 1)), (1, 70, 33, (1, 1)),
                                                   (1, 8, 5, (56, 56)), (3, 5, 9, (29, 31)), (1, 24, 300, (7, 7)),
                                                   (2, 300, 21, (6, 6)), (1, 300, 11, (4, 5))])
@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_matches_conv2d(batch, inp, out, size, threads, dtype, bias):
    x = make_input(batch, inp, *size, dtype=dtype)
    # Scaled as a layer's weights are: with unit weights 300 inputs give outputs of ~17, where
    # float32's summation error alone (at::conv2d's too) passes 1e-5 in absolute terms.
    weight = torch.randn(out, inp, 1, 1, dtype=dtype) / inp ** 0.5
    b = torch.randn(out, dtype=dtype) if bias else None
    with intra_op_threads(threads):
        result = torch.ops.ghostkernels.pointwise_conv2d(x, weight, b)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(result, F.conv2d(x, weight, b), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_opcheck(channels_last):
    x = make_input(2, 6, 5, 7, channels_last=channels_last)
    torch.library.opcheck(torch.ops.ghostkernels.pointwise_conv2d,
                          (x, torch.randn(4, 6, 1, 1, dtype=torch.float64), torch.randn(4, dtype=torch.float64)))


def test_pointwise_no_input_channels_is_an_error():
    """F.conv2d returns no output channels there, the GEMM C_out channels of bias."""
    with pytest.raises(BAD_ARGUMENT, match="pointwise_conv2d: x must have at least one channel"):
        torch.ops.ghostkernels.pointwise_conv2d(torch.randn(2, 0, 4, 5), torch.randn(4, 0, 1, 1), torch.randn(4))


def test_pointwise_nan_stays_where_conv2d_puts_it():
    x, weight, b = torch.randn(2, 6, 5, 7), torch.randn(4, 6, 1, 1), torch.randn(4)
    x[0, 1, 2, 3] = weight[2, 0, 0, 0] = float("nan")
    out = torch.ops.ghostkernels.pointwise_conv2d(x, weight, b)
    torch.testing.assert_close(out, F.conv2d(x, weight, b), rtol=1e-5, atol=1e-5, equal_nan=True)


# Its stride (a downsample shortcut: the item's pixels gathered first), ReLU and residual (a
# block's last 1x1 conv, its shortcut's add and ReLU, which freeze() fuses): act(conv + residual).
# 112x112 at stride 2: seven chunks of 448 pixels, 3 threads for an uneven split; 9x11 at stride 3:
# rows that end inside a chunk; 2x2 at stride 2 and 5x5 with 300 inputs: one output pixel or a few,
# by the GEMM (dot products); 1x1 maps: the GEMV, the residual and ReLU after it; batch 0.
@pytest.mark.parametrize("batch, inp, out, size, stride", [(1, 32, 24, (112, 112), 2), (2, 7, 5, (9, 11), 3),
                                                           (3, 5, 9, (2, 2), 2), (1, 300, 37, (5, 5), 2),
                                                           (2, 16, 8, (1, 1), 2), (1, 40, 80, (14, 14), 1),
                                                           (0, 4, 6, (3, 3), 2)])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pointwise_epilogue_matches_conv2d(batch, inp, out, size, stride, activation, residual, threads, dtype):
    x = make_input(batch, inp, *size, dtype=dtype)
    weight = torch.randn(out, inp, 1, 1, dtype=dtype) / inp ** 0.5
    b = torch.randn(out, dtype=dtype)
    expected = F.conv2d(x, weight, b, stride)
    r = torch.randn_like(expected) if residual else None
    expected = expected + r if residual else expected
    with intra_op_threads(threads):
        result = torch.ops.ghostkernels.pointwise_conv2d(x, weight, b, stride, activation, r)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(result, F.relu(expected) if activation == "relu" else expected, rtol=tolerance,
                               atol=tolerance)
    assert result.is_contiguous()


# A residual that broadcasts, has another dtype or layout: the out-of-place add's result (what
# freeze() fused it from), its shape and promoted dtype, NaN kept through the ReLU.
@pytest.mark.parametrize("residual_shape, residual_dtype, channels_last",
                         [((2, 6, 1, 1), torch.float32, False), ((2, 6, 3, 4), torch.float64, False),
                          ((3, 2, 6, 3, 4), torch.float32, False), ((2, 6, 3, 4), torch.float32, True)])
def test_pointwise_residual_is_an_out_of_place_add(residual_shape, residual_dtype, channels_last):
    x, weight, b = torch.randn(2, 8, 5, 7), torch.randn(6, 8, 1, 1), torch.randn(6)
    residual = torch.randn(residual_shape, dtype=residual_dtype)
    if channels_last:
        residual = residual.to(memory_format=torch.channels_last)
    x[0, 1, 2, 4] = float("nan")
    expected = F.relu(F.conv2d(x, weight, b, 2) + residual)
    out = torch.ops.ghostkernels.pointwise_conv2d(x, weight, b, 2, "relu", residual)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    with FakeTensorMode() as mode:
        fake = torch.ops.ghostkernels.pointwise_conv2d(*(mode.from_tensor(t) for t in (x, weight, b)), 2, "relu",
                                                       mode.from_tensor(residual))
    assert fake.shape == out.shape and fake.dtype == out.dtype and fake.stride() == out.stride()


@pytest.mark.parametrize("args, message", [((0, "none", None), "stride must be >= 1, got 0"),
                                           ((1, "gelu", None), "activation must be 'relu' or 'none', got 'gelu'"),
                                           ((2, "none", torch.randn(2, 6, 5, 5)), None)])
def test_pointwise_epilogue_errors_name_the_argument(args, message):
    x, weight = torch.randn(2, 8, 7, 7), torch.randn(6, 8, 1, 1)
    if message is None:  # a residual that the output does not broadcast to: the add's own error
        with pytest.raises(RuntimeError, match="must match the size"):
            torch.ops.ghostkernels.pointwise_conv2d(x, weight, None, *args)
        return
    with pytest.raises(BAD_ARGUMENT, match=f"pointwise_conv2d: {message}"):
        torch.ops.ghostkernels.pointwise_conv2d(x, weight, None, *args)


@pytest.mark.parametrize("stride, activation, residual", [(2, "relu", True), (3, "none", False), (1, "relu", True)])
def test_pointwise_epilogue_opcheck_and_gradcheck(stride, activation, residual):
    x = make_input(2, 6, 5, 7, requires_grad=True)
    weight = torch.randn(4, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, -(-5 // stride), -(-7 // stride), dtype=torch.float64, requires_grad=True) \
        if residual else None
    args = (x, weight, b, stride, activation, r)
    torch.library.opcheck(torch.ops.ghostkernels.pointwise_conv2d, args)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.ghostkernels.pointwise_conv2d(*t), args)


# A channel slice of a batch (G-GhostNet's inner blocks read x0[:, :raw]): each image contiguous,
# one image apart; the GEMM reads it in place, the 1x1 maps' dot products from a copy.
@pytest.mark.parametrize("size, stride", [((6, 7), 1), ((6, 7), 2), ((1, 1), 1)])
def test_pointwise_reads_a_channel_slice_of_a_batch(size, stride):
    x = make_input(3, 10, *size)[:, 2:8]
    weight, b = torch.randn(5, 6, 1, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    out = torch.ops.ghostkernels.pointwise_conv2d(x, weight, b, stride, "relu")
    torch.testing.assert_close(out, F.relu(F.conv2d(x, weight, b, stride)), rtol=1e-12, atol=1e-12)
    pooled = torch.ops.ghostkernels.pointwise_conv2d_pool(x, weight, b, "none")
    torch.testing.assert_close(pooled, F.conv2d(x, weight, b).mean((2, 3), keepdim=True), rtol=1e-12, atol=1e-12)


class _ResidualEnd(nn.Module):
    """A 1x1 conv, then a shortcut's add in one of several spellings and a ReLU, as a ResNet or
    RegNet block ends; `reread`: the conv's output is read elsewhere too."""

    def __init__(self, add, relu, reread=False):
        super().__init__()
        self.conv, self.shortcut = nn.Conv2d(8, 6, 1, stride=2), nn.Conv2d(8, 6, 1, stride=2)
        self.add, self.relu, self.reread = add, relu, reread

    def forward(self, x):
        y = out = self.conv(x)
        if self.add == "add":
            out = out + self.shortcut(x)
        elif self.add == "radd":
            out = self.shortcut(x) + out
        elif self.add == "add_":  # in place: the original G-GhostNet's and torchvision's blocks
            out += self.shortcut(x)
        elif self.add == "add_64":  # in place, a float64 residual: the result stays float32
            out += self.shortcut(x).double()
        elif self.add == "radd_":  # in place into the shortcut's output: that conv takes the add
            out = self.shortcut(x).add_(out)
        elif self.add == "alpha":
            out = torch.add(out, self.shortcut(x), alpha=2)
        elif self.add == "scalar":
            out = out + 3
        if self.relu:
            out = F.relu(out, inplace=self.relu == "relu_")
        return out + y.amax() if self.reread else out


@pytest.mark.filterwarnings("ignore")  # torch.jit's deprecation and tracer warnings
@pytest.mark.parametrize("add, relu, reread, fused", [
    ("add", "relu_", False, 2), ("radd", "relu", False, 2), ("add", None, False, 1), ("none", "relu_", False, 1),
    ("add_", "relu_", False, 2), ("add_64", "relu_", False, 2), ("radd_", None, False, 1),
    ("alpha", "relu", False, 0), ("scalar", None, False, 0), ("none", "relu", True, 0),
    ("add", "relu", True, 2),  # the conv's output read twice: the shortcut's conv takes the add and ReLU
])
def test_freeze_fuses_pointwise_epilogues_only_where_they_keep_the_meaning(add, relu, reread, fused):
    from ghostkernels.modules import fuse_pointwise_epilogues
    model = ghostkernels.accelerate(_ResidualEnd(add, relu, reread).eval())
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        graph = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False)).graph
    assert fuse_pointwise_epilogues(graph) == fused
    frozen = ghostkernels.freeze(model, x)
    with torch.no_grad():
        out, expected = frozen(x), model(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


class _RandomResidualBlock(nn.Module):
    """A ResNet-style block drawn at random: a 1x1 conv (+BN) with or without a ReLU, a 3x3 conv,
    a 1x1 conv (+BN), the shortcut (identity or a strided 1x1 conv + BN) added in place or not,
    on either side, and a ReLU or none."""

    def __init__(self, rng, chs, stride):
        super().__init__()
        mid, out = rng.choice([8, 12, 20]), chs if stride == 1 and rng.random() < 0.5 else rng.choice([8, 16, 24])
        self.reduce = nn.Sequential(nn.Conv2d(chs, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    *([nn.ReLU(inplace=rng.random() < 0.5)] if rng.random() < 0.7 else []))
        self.conv = nn.Conv2d(mid, mid, 3, stride, 1)
        self.expand = nn.Sequential(nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = (nn.Identity() if stride == 1 and out == chs else
                         nn.Sequential(nn.Conv2d(chs, out, 1, stride, bias=False), nn.BatchNorm2d(out)))
        self.add, self.relu, self.out_chs = rng.choice(["add", "radd", "add_"]), rng.random() < 0.7, out

    def forward(self, x):
        y, shortcut = self.expand(self.conv(self.reduce(x))), self.shortcut(x)
        if self.add == "add_":
            y += shortcut
        else:
            y = y + shortcut if self.add == "add" else shortcut + y
        return torch.relu(y) if self.relu else y


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(6))
def test_freeze_never_changes_random_residual_networks(seed):
    """Random stacks of those blocks, accelerated and frozen: the model's outputs and dtype, at 1-3
    threads (the fused ops' work split)."""
    rng = random.Random(seed)
    layers, chs = [], 8
    for stride in rng.sample([1, 1, 2, 2, 1], 5):
        block = _RandomResidualBlock(rng, chs, stride)
        layers.append(block)
        chs = block.out_chs
    net = randomise_bn(nn.Sequential(*layers), spread=0.2).eval()
    x = torch.randn(2, 8, 19, 17)
    with torch.no_grad(), intra_op_threads(1 + seed % 3):
        expected = net(x)
        frozen = ghostkernels.freeze(ghostkernels.accelerate(net), x)
        out = frozen(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    kinds = [node.kind() for node in frozen.graph.graph.nodes()]
    assert "aten::_convolution" in kinds and not {"aten::add", "aten::add_"} & set(kinds)


class _InPlaceBottleneck(g_ghost_regnet.Bottleneck):
    """The zoo's RegNetX block with the original G-GhostNet code's forward: `out += identity`."""

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("in_place", [False, True], ids=["zoo", "original-forward"])
def test_frozen_regnet_blocks_end_in_one_op(in_place):
    """G-Ghost RegNetX's downsample shortcuts (1x1, stride 2) run the GEMM, and each block's last
    1x1 conv takes its shortcut's add and ReLU, whether the add is out of place (the zoo) or in
    place (the original code; a type_as after each op). The last inner block of a stage writes into
    the stage's buffer with add(out=): left as it is."""
    model = models.g_ghost_regnetx("002", fused=False).eval()
    blocks = [m for m in model.modules() if type(m) is g_ghost_regnet.Bottleneck]
    for block in blocks if in_place else ():
        block.__class__ = _InPlaceBottleneck
    kinds = frozen_node_kinds(ghostkernels.accelerate(model), torch.randn(2, 3, 64, 64))
    assert "aten::_convolution" not in kinds and "aten::add_" not in kinds
    assert kinds.count("aten::add") == kinds.count("aten::relu_") == 2  # the two stages' last inner blocks
    assert kinds.count("aten::type_as") == (len(blocks) - 2 if in_place else 0)


# -- the backward (direct_conv2d_backward) and DepthwiseConv2d, what accelerate() trains with ----


@pytest.mark.parametrize("k, stride, bias, size, dtype",
                         list(itertools.product([1, 3, 5, 7], [1, 2], [True, False], [(9, 11), (2, 1), (12, 14)],
                                                [torch.float64, torch.float32])))
def test_depthwise_gradients_match_conv2d(k, stride, bias, size, dtype):
    conv = torch.nn.Conv2d(5, 5, k, stride, k // 2, groups=5, bias=bias).to(dtype)
    depthwise = DepthwiseConv2d.from_conv(conv)
    assert depthwise.weight is conv.weight  # shared: optimiser state carries over
    x = make_input(3, 5, *size, dtype=dtype)
    grads = []
    for module in (conv, depthwise):
        xi = x.clone().requires_grad_()
        out = module(xi)
        grad = torch.randn_like(out) if not grads else grads[0][0]
        grads.append((grad, out, *torch.autograd.grad(out, [xi, *module.parameters()], grad)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(grads[1][1:], grads[0][1:]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("weight_shape, stride", [((4, 1, 3, 3), 2), ((4, 1, 5, 5), 1), ((8, 2, 3, 3), 1)])
def test_backward_opcheck(weight_shape, stride):
    """Depthwise (C++) and grouped (the library's backward) weights."""
    x = make_input(2, 4, 7, 6)
    weight = torch.randn(weight_shape, dtype=torch.float64)
    grad = torch.randn_like(F.conv2d(x, weight, None, stride, weight_shape[-1] // 2, groups=4 // weight_shape[1]))
    torch.library.opcheck(torch.ops.ghostkernels.direct_conv2d_backward.default, (grad, x, weight, stride))


def test_depthwise_module_other_inputs_take_the_conv():
    conv = torch.nn.Conv2d(4, 4, 3, 1, 1, groups=4)
    depthwise = DepthwiseConv2d.from_conv(conv)
    for x in (torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last), torch.randn(2, 4, 5, 5).bfloat16()):
        expected = conv.to(x.dtype)(x)
        torch.testing.assert_close(depthwise(x), expected)
    assert not DepthwiseConv2d.eligible(torch.nn.Conv2d(4, 8, 3, 1, 1, groups=4))
    assert not DepthwiseConv2d.eligible(torch.nn.Conv2d(4, 4, 3, 3, 1, groups=4))


# The channels-in-lanes kernel (csrc/depthwise_lanes.h) takes the float32 depthwise convs with 3x3 and
# 5x5 taps of planes up to 64 wide, 32 at stride 1: 16 channels make one whole vector of lanes, 17 and
# 40 a partial last one; 300 rows make several bands, 2 and 8 threads split the bands further; 7x7
# taps and float64 take the phase split. Output rows of 5-7 pixels are one pass of 8 whose extra
# pixels land on the next row or the band's slack: 7 (14 wide at stride 2, 7 at stride 1), 6 (11
# wide at stride 2), 5 (9 wide at stride 2, 5 at stride 1), several bands of them (300 x 13).
@pytest.mark.parametrize("channels", [16, 17, 40])
@pytest.mark.parametrize("k, stride", [(3, 2), (5, 2), (7, 2), (3, 1), (5, 1)])
@pytest.mark.parametrize("size", [(14, 14), (7, 7), (300, 20), (28, 56), (9, 11), (6, 9), (5, 5), (300, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_depthwise_channels_in_lanes(channels, k, stride, size, dtype):
    x = torch.randn(2, channels, *size, dtype=dtype)
    weight, bias = torch.randn(channels, 1, k, k, dtype=dtype), torch.randn(channels, dtype=dtype)
    expected = F.conv2d(x, weight, bias, stride, k // 2, groups=channels)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for threads in (1, 2, 8):
        with intra_op_threads(threads):
            out = torch.ops.ghostkernels.direct_conv2d(x, weight, bias, stride)
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


# The output-channels-in-lanes kernel (csrc/dense_lanes.h) takes float32 dense 3x3 convs of up to 4
# inputs whose outputs fill whole vectors of lanes (16 on AVX-512, 8 on AVX2: 16, 32 and 48 either
# way; 8 on AVX2 only, 20 on neither); 224x224 is GhostNet's stem, 1x1 and 2x3 planes have a
# single tile column block, 300 rows make several bands, and 2 and 8 threads split the bands
# further. A row's last pixels past its end are computed and not stored.
@pytest.mark.parametrize("inp, out_channels", [(3, 16), (3, 32), (1, 48), (4, 16), (3, 8), (3, 20)])
@pytest.mark.parametrize("stride, size, activation", [(2, (224, 224), "relu")] + list(
    itertools.product([1, 2], [(1, 1), (2, 3), (300, 20), (9, 37)], ["none", "relu"])))
def test_dense_channels_in_lanes(inp, out_channels, stride, size, activation):
    x = torch.randn(2, inp, *size)
    weight, bias = torch.randn(out_channels, inp, 3, 3), torch.randn(out_channels)
    expected = F.conv2d(x, weight, bias, stride, 1)
    if activation == "relu":
        expected = F.relu(expected)
    for threads in (1, 2, 8):
        with intra_op_threads(threads):
            out = torch.ops.ghostkernels.direct_conv2d(x, weight, bias, stride, activation)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.is_contiguous()


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_dense_channels_in_lanes_without_bias_and_with_nan(activation):
    x = torch.randn(3, 3, 17, 23)
    x[0, 1, 2, 3] = x[2, :, -1, -1] = float("nan")
    weight = torch.randn(32, 3, 3, 3)
    weight[5, 0, 1, 1] = float("nan")
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, None, 2, activation)
    expected = F.conv2d(x, weight, None, 2, 1)
    torch.testing.assert_close(out, F.relu(expected) if activation == "relu" else expected, rtol=1e-5, atol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("weights_channels_last", [False, True])
@pytest.mark.parametrize("name, weight_shape, stride", [("direct_conv2d", (12, 1, 3, 3), 2),
                                                         ("pointwise_conv2d", (7, 12, 1, 1), None)])
def test_library_conv_layout_matches_the_fake_kernel(device, weights_channels_last, name, weight_shape, stride):
    """NCHW on the CPU (the C++ kernels write NCHW); a channels_last x keeps its layout on other
    devices ('meta' stands in for CUDA here), so that an accelerated channels_last GhostNet stays
    channels_last on a GPU. The fallback (the op on CUDA) and the fake kernel must agree whatever
    the weight's layout, which the library conv's output otherwise follows."""
    from ghostkernels import modules
    x = torch.randn(2, 12, 9, 7, device=device).to(memory_format=torch.channels_last)
    weight = torch.randn(weight_shape, device=device)
    if weights_channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    args = (x, weight, None) + ((stride,) if stride else ())
    fallback = {"direct_conv2d": direct_conv._fallback, "pointwise_conv2d": modules._pointwise_composed}[name]
    out = fallback(*args)
    with FakeTensorMode() as mode:
        fake = getattr(torch.ops.ghostkernels, name)(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                        for a in args))
    expected = torch.contiguous_format if device == "cpu" else torch.channels_last
    assert out.is_contiguous(memory_format=expected) and out.stride() == fake.stride()


# The Triton kernel (ghostkernels/triton_direct_conv.py), the op's CUDA kernel for channels_last
# inputs: on a GPU when there is one, else on the CPU in Triton's interpreter (never skipped).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 on the CPU is exact up to summation order; half precision rounds the inputs and output
TRITON_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# (in, out, inputs per group): depthwise (16: whole vectors of channels), the stem (dense), a
# depthwise conv with two outputs per channel, grouped with 2 inputs, odd channel counts
DEPTHWISE, STEM, MULTIPLIER, GROUPED, ODD = (16, 16, 1), (3, 16, 3), (4, 8, 1), (8, 12, 2), (5, 5, 1)
# (k, stride, size, batch)
TRITON_GEOMETRIES = [(3, 2, (9, 11), 2), (5, 1, (6, 7), 1), (1, 2, (5, 4), 1), (7, 2, (10, 3), 1), (3, 1, (1, 1), 3),
                     (3, 2, (4, 4), 0)]
# (convolution, geometry, channels_last, dtype): in the interpreter every combination in float32
# and float64; on a GPU, where each is a compile, one case per code path and dtype.
TRITON_CASES = {
    "cpu": [(conv, geometry, cl, dtype) for conv in (DEPTHWISE, STEM, MULTIPLIER, GROUPED, ODD)
            for geometry in TRITON_GEOMETRIES for cl in (False, True) for dtype in (torch.float64, torch.float32)],
    "cuda": [(DEPTHWISE, TRITON_GEOMETRIES[0], True, torch.float16),
             (STEM, TRITON_GEOMETRIES[0], True, torch.float16),
             (ODD, TRITON_GEOMETRIES[1], True, torch.float16),
             (MULTIPLIER, TRITON_GEOMETRIES[3], True, torch.bfloat16),
             (GROUPED, TRITON_GEOMETRIES[2], True, torch.float32),
             (DEPTHWISE, TRITON_GEOMETRIES[1], True, torch.float64),
             (STEM, TRITON_GEOMETRIES[4], False, torch.float16),
             (DEPTHWISE, TRITON_GEOMETRIES[5], True, torch.float16)],
}[TRITON_DEVICE]


def triton_case_id(case):
    (inputs, outputs, group_inputs), (k, stride, size, batch), cl, dtype = case
    return f"{inputs}-{outputs}-g{group_inputs}-k{k}-s{stride}-{size[0]}x{size[1]}-n{batch}-{'cl' if cl else 'nchw'}-" \
           f"{str(dtype)[6:]}"


@pytest.mark.parametrize("case", TRITON_CASES, ids=triton_case_id)
def test_triton_kernel_matches_conv2d(case):
    from ghostkernels import triton_direct_conv
    (inputs, outputs, group_inputs), (k, stride, size, batch), channels_last, dtype = case
    x = make_input(batch, inputs, *size, channels_last=channels_last, dtype=dtype).to(TRITON_DEVICE)
    weight = torch.randn(outputs, group_inputs, k, k, dtype=dtype, device=TRITON_DEVICE)
    bias = torch.randn(outputs, dtype=dtype, device=TRITON_DEVICE)
    groups = inputs // group_inputs
    for b, activation in ((bias, "relu"), (None, "none")):
        out = triton_direct_conv.direct_conv2d(x, weight, b, stride, activation)
        expected = F.conv2d(x.double(), weight.double(), b.double() if b is not None else None, stride, k // 2,
                            groups=groups)
        if activation == "relu":
            expected = expected.relu()
        tol = TRITON_TOLERANCE[dtype]
        assert out.dtype == dtype and out.shape == expected.shape
        assert out.is_contiguous(memory_format=output_memory_format(x))
        scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("channels", [(6, 6, 1), (3, 16, 3)], ids=["depthwise", "stem"])
def test_triton_kernel_keeps_nan_through_the_relu(channels):
    from ghostkernels import triton_direct_conv
    inputs, outputs, group_inputs = channels
    x = make_input(1, inputs, 6, 5, channels_last=True).to(TRITON_DEVICE)
    x[0, 0, 2, 3] = float("nan")
    weight = torch.randn(outputs, group_inputs, 3, 3, dtype=torch.float64, device=TRITON_DEVICE)
    out = triton_direct_conv.direct_conv2d(x, weight, None, 1, "relu")
    expected = F.conv2d(x, weight, None, 1, 1, groups=inputs // group_inputs).relu()
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    torch.testing.assert_close(out, expected, equal_nan=True)


def test_triton_route():
    """Channels_last convs the op is for take the Triton kernel on CUDA; NCHW, wide groups and
    mixed dtypes keep the library conv (which raises its own errors)."""
    from ghostkernels.direct_conv import takes_triton
    x = make_input(2, 8, 9, 9, channels_last=True)
    depthwise, bias = torch.randn(8, 1, 3, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert takes_triton(x, depthwise, bias) and takes_triton(x, depthwise, None)
    assert takes_triton(make_input(2, 3, 9, 9, channels_last=True), torch.randn(16, 3, 3, 3, dtype=torch.float64),
                        None)
    assert not takes_triton(x.contiguous(), depthwise, bias)
    assert not takes_triton(x, torch.randn(8, 8, 3, 3, dtype=torch.float64), bias)
    assert not takes_triton(x, depthwise.float(), bias)
    assert not takes_triton(x, depthwise, bias.float())


@pytest.mark.parametrize("args, message", [
    (((1, 4, 5, 5), (4, 1, 2, 2), None, 1), "weight must be"), (((1, 4, 5, 5), (4, 1, 3, 3), (3,), 1), "bias must"),
    (((1, 4, 5, 5), (4, 1, 3, 3), None, 3), "stride must be 1 or 2"), (((4, 5, 5), (4, 1, 3, 3), None, 1), "4-D"),
    (((1, 4, 0, 5), (4, 1, 3, 3), None, 1), "H, W >= 1")], ids=["even", "bias", "stride", "3-D", "empty"])
@pytest.mark.parametrize("path", ["fallback", "fake"])
def test_fallback_and_fake_raise_the_kernels_errors(args, message, path):
    """Without the C++ kernel (GHOSTKERNELS_DISABLE_CPP=1, other devices: the library conv) and under
    torch.compile (the fake kernel) a bad argument gets the C++ kernel's message, not F.conv2d's or
    none (F.conv2d takes an even kernel or a stride of 3 and returns another shape)."""
    x_shape, weight_shape, bias_shape, stride = args
    tensors = [torch.randn(shape, dtype=torch.float64) for shape in (x_shape, weight_shape)]
    tensors.append(torch.randn(bias_shape, dtype=torch.float64) if bias_shape else None)
    if path == "fake":
        with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
            torch.ops.ghostkernels.direct_conv2d(*(mode.from_tensor(t) if t is not None else None for t in tensors),
                                                 stride)
    else:
        with pytest.raises(RuntimeError, match=message):
            direct_conv._fallback(*tensors, stride)


@pytest.mark.parametrize("weight_shape, grad_shape, message", [
    ((4, 1, 4, 4), (2, 4, 3, 3), "weight must be"), ((4, 1, 3, 3), (2, 4, 3, 4), r"grad must have shape \[2, 4, 3, 3\]"),
    ((4, 1, 3, 3), (2, 3, 3, 3), r"grad must have shape \[2, 4, 3, 3\]")], ids=["even", "grad-width", "grad-channels"])
def test_backward_raises_the_kernels_errors(weight_shape, grad_shape, message):
    """The backward op (direct calls; DepthwiseConv2d's autograd) checks what the forward does and
    grad's shape: the C++ kernel wrote past its buffers with a 4 x 4 weight (a heap corruption)."""
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    args = (torch.randn(grad_shape, dtype=torch.float64), x, torch.randn(weight_shape, dtype=torch.float64), 2)
    for entry in (torch.ops.ghostkernels.direct_conv2d_backward, direct_conv._backward_fallback,
                  direct_conv._backward_fake):
        with pytest.raises(RuntimeError, match=message):
            entry(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's CUDA kernel: needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_op_takes_triton_and_checks(dtype):
    x = make_input(2, 24, 14, 14, channels_last=True, dtype=dtype).cuda()
    weight = torch.randn(24, 1, 5, 5, dtype=dtype, device="cuda")
    bias = torch.randn(24, dtype=dtype, device="cuda")
    out = torch.ops.ghostkernels.direct_conv2d(x, weight, bias, 2, "relu")
    expected = F.conv2d(x.double(), weight.double(), bias.double(), 2, 2, groups=24).relu()
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    torch.library.opcheck(torch.ops.ghostkernels.direct_conv2d, (x, weight, bias, 2, "relu"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.ghostkernels.direct_conv2d(x, weight, bias[:3], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's CUDA kernel: needs a GPU")
def test_cuda_ghost_depthwise_5x5_runs_its_conv_on_triton():
    """ghost_module_depthwise's composed CUDA path (a 5 x 5 conv_dw, which the fused rows kernel
    does not take) with its conv by direct_conv2d: as the library conv gives it."""
    from ghostkernels import ghost_depthwise
    x = make_input(2, 16, 14, 14, channels_last=True, dtype=torch.float16).cuda()
    weights = [w.cuda() for w in make_weights(16, 32, 2, 3, dtype=torch.float16)]
    conv = [t.to("cuda", torch.float16) for t in (torch.randn(32, 1, 5, 5) / 5, torch.randn(32))]
    args = (x, *weights, 32, 1, "relu", *conv, 2)
    out = torch.ops.ghostkernels.ghost_module_depthwise(*args)
    expected = ghost_depthwise._composed(*args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_depthwise.default, args)
