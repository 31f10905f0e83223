"""ghostkernels::dfc_logits (GhostNetV2's DFC attention logits: a 2x2 average pool, a 1x1 conv and
depthwise 1 x k and k x 1 convs) against its ATen composition, and GhostModuleV2's use of it."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ghostkernels
from ghostkernels import GhostModuleV2, dfc_attention
from ghostkernels.modules import conv_bn_sequence
from ghostkernels.reference import upsampled_gate

from conftest import intra_op_threads, make_input, randomise_bn

op = torch.ops.ghostkernels.dfc_logits


def expected(x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride):
    """short_conv as GhostNetV2 writes it, op by op, with its BNs folded."""
    channels = weight.shape[0]
    z = F.conv2d(F.avg_pool2d(x, 2), weight, bias, stride)
    z = F.conv2d(z, horizontal_weight, horizontal_bias, padding=(0, horizontal_weight.shape[3] // 2), groups=channels)
    return F.conv2d(z, vertical_weight, vertical_bias, padding=(vertical_weight.shape[2] // 2, 0), groups=channels)


def weights(inp, out, kw=5, kh=5, dtype=torch.float64, bias=True):
    b = (lambda: torch.randn(out, dtype=dtype)) if bias else (lambda: None)
    return (torch.randn(out, inp, 1, 1, dtype=dtype) / inp ** 0.5, b(), torch.randn(out, 1, 1, kw, dtype=dtype) / kw,
            b(), torch.randn(out, 1, kh, 1, dtype=dtype) / kh, b())


# (inp, out, H, W): pooled planes of 1x1 and 1xn, odd sizes (the pool floors), a channel count
# that leaves a vector's lanes empty, GhostNetV2's 28x28 and 3x3 pooled planes; 3 and 20 output
# channels: a pixel's channels in 1 to 3 vectors and in more (the depthwise taps' blocks)
SHAPES = [(3, 5, 2, 3), (4, 9, 3, 9), (7, 13, 11, 8), (24, 72, 56, 56), (40, 37, 15, 14), (160, 96, 7, 7),
          (6, 3, 10, 12), (6, 20, 10, 12)]


@pytest.mark.parametrize("shape, taps, stride, bias, channels_last", list(itertools.product(
    SHAPES, [(5, 5), (1, 3), (7, 1)], [1, 2], [True, False], [False, True])))
def test_matches_composition_float64(shape, taps, stride, bias, channels_last):
    inp, out, h, w = shape
    x = make_input(2, inp, h, w, channels_last=channels_last)
    args = weights(inp, out, *taps, bias=bias) + (stride,)
    result = op(x, *args)
    assert result.is_contiguous()
    torch.testing.assert_close(result, expected(x, *args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("outputs", [3, 20, 37])
def test_float32_channel_counts(outputs):
    """A pixel's channels in 1, 3 and 5 float32 vectors (AVX2; 1 to 3 on AVX-512)."""
    x = torch.randn(2, 6, 10, 12)
    args = weights(6, outputs, dtype=torch.float32) + (1,)
    torch.testing.assert_close(op(x, *args), expected(x, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, threads", [(0, 1), (1, 1), (1, 2), (3, 2), (1, 3)])
def test_float32(batch, threads):
    """Blocks of output channels over the threads at batch 1, images over them at batch 3."""
    x = torch.randn(batch, 112, 14, 14)
    args = weights(112, 672, dtype=torch.float32) + (1,)
    with intra_op_threads(threads):
        result = op(x, *args)
    torch.testing.assert_close(result, expected(x, *args), rtol=1e-5, atol=1e-5)


def test_nan_propagates():
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    x[0, 1, 2, 3] = float("nan")
    args = weights(4, 8) + (1,)
    torch.testing.assert_close(op(x, *args), expected(x, *args), equal_nan=True)


def test_opcheck_and_gradcheck():
    x = make_input(2, 5, 7, 6, requires_grad=True)
    args = [t.requires_grad_() for t in weights(5, 6, 3, 5)]
    torch.library.opcheck(op.default, (x, *args, 1))
    assert torch.autograd.gradcheck(lambda *a: op(*a, 1), (x, *args))


@pytest.mark.parametrize("case, message", [
    ("3-D x", "x must be 4-D"),
    ("wrong weight", "weight must be"),
    ("even taps", "horizontal_weight must be"),
    ("vertical as horizontal", "vertical_weight must be"),
    ("wrong bias", "vertical_bias must have shape"),
    ("dtype", "horizontal_bias must match x's dtype"),
    ("too small", r"x of size \[1, 4, 1, 6\] is too small for the 2x2 average pool"),
    ("stride", "stride must be >= 1"),
])
def test_bad_arguments_are_named(case, message):
    x, args, stride = torch.randn(1, 4, 6, 6), list(weights(4, 6, dtype=torch.float32)), 1
    if case == "3-D x":
        x = x[0]
    elif case == "wrong weight":
        args[0] = torch.randn(6, 5, 1, 1)
    elif case == "even taps":
        args[2] = torch.randn(6, 1, 1, 4)
    elif case == "vertical as horizontal":
        args[4] = torch.randn(6, 1, 1, 5)
    elif case == "wrong bias":
        args[5] = torch.randn(5)
    elif case == "dtype":
        args[3] = args[3].double()
    elif case == "too small":
        x = torch.randn(1, 4, 1, 6)
    else:
        stride = 0
    with pytest.raises((RuntimeError, ValueError, TypeError), match=f"dfc_logits: {message}"):
        op(x, *args, stride)


def _original_output(module, x):
    """GhostModuleV2's output op by op: the Ghost module's, times the gate of its short_conv (its
    BNs in eval mode, not folded)."""
    folded = module.folded_weights()
    ungated = ghostkernels.ghost_module_reference(x, *folded[:4], out_channels=module.oup)
    return ungated * upsampled_gate(module.short_conv(F.avg_pool2d(x, 2)), ungated.shape[-2:])


@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_module_v2_runs_the_op(channels_last):
    module = randomise_bn(GhostModuleV2(8, 12), spread=0.2).eval()
    x = make_input(2, 8, 9, 7, channels_last=channels_last, dtype=torch.float32)
    with torch.no_grad():
        graph = torch.jit.trace(module, x, check_trace=False).inlined_graph
        assert "ghostkernels::dfc_logits" in [node.kind() for node in graph.nodes()]
        torch.testing.assert_close(module(x), _original_output(module, x), rtol=1e-5, atol=1e-6)


def test_other_short_convs_run_op_by_op():
    """A short_conv the op does not compute (reflect padding, a 3x3 first conv) gives the module's
    own result."""
    module = randomise_bn(GhostModuleV2(8, 12), spread=0.2).eval()
    x = torch.randn(2, 8, 10, 12)
    for change in (lambda s: setattr(s[2], "padding_mode", "reflect"),
                   lambda s: s.__setitem__(0, nn.Conv2d(8, 12, 3, padding=1, bias=False))):
        change(module.short_conv)
        module.eval()  # refold
        assert dfc_attention.fused_stride(conv_bn_sequence(module.short_conv)) is None
        with torch.no_grad():
            torch.testing.assert_close(module(x), _original_output(module, x), rtol=1e-5, atol=1e-6)
