"""ghostkernels::depthwise_conv2d (folded conv_dw / shortcut convs) against F.conv2d."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ghostkernels.depthwise import DepthwiseConv2d

from conftest import make_input


# (12, 14): even rows shorter than a vector pair; (37, 70): rows split one by one, several L1 bands
SIZES = [(9, 11), (2, 1), (12, 14), (37, 70)]


@pytest.mark.parametrize("k, stride, channels_last, bias, size",
                         list(itertools.product([1, 3, 5, 7], [1, 2], [False, True], [True, False], SIZES)))
def test_matches_conv2d(k, stride, channels_last, bias, size):
    x = make_input(2, 5, *size, channels_last=channels_last)
    weight = torch.randn(5, 1, k, k, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if bias else None
    out = torch.ops.ghostkernels.depthwise_conv2d(x, weight, b, stride)
    torch.testing.assert_close(out, F.conv2d(x, weight, b, stride, k // 2, groups=5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", SIZES)
def test_float32(size):
    x, weight = torch.randn(3, 6, *size), torch.randn(6, 1, 5, 5)
    out = torch.ops.ghostkernels.depthwise_conv2d(x, weight, None, 2)
    torch.testing.assert_close(out, F.conv2d(x, weight, None, 2, 2, groups=6), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    out = torch.ops.ghostkernels.depthwise_conv2d(torch.randn(0, 4, 8, 8), torch.randn(4, 1, 3, 3), None, 2)
    assert out.shape == (0, 4, 4, 4)


def test_float32_and_module():
    conv = torch.nn.Conv2d(8, 8, 5, 2, 2, groups=8)
    module = DepthwiseConv2d.from_conv(conv)
    x = torch.randn(3, 8, 15, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), rtol=1e-5, atol=1e-5)
    assert DepthwiseConv2d.eligible(conv) and not DepthwiseConv2d.eligible(torch.nn.Conv2d(8, 8, 3, padding=1))


def test_gradcheck_and_opcheck():
    x = make_input(1, 3, 6, 5, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.ghostkernels.depthwise_conv2d(*a, 2), (x, weight, bias))
    torch.library.opcheck(torch.ops.ghostkernels.depthwise_conv2d.default, (x, weight, bias, 2))


def test_bad_weight():
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.ghostkernels.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 2, 2), None, 1)
