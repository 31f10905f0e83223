"""ghostkernels::pointwise_conv2d_pool (a 1x1 conv, its activation and the global average pool)
against its ATen composition, and freeze()'s rewrite that makes it."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ghostkernels
from ghostkernels import models
from ghostkernels.pointwise_pool import fuse_pointwise_pools

from conftest import frozen_node_kinds, make_input

op = torch.ops.ghostkernels.pointwise_conv2d_pool


def expected(x, weight, bias, activation):
    z = F.conv2d(x, weight, bias)
    return (z.relu() if activation == "relu" else z).mean((2, 3), keepdim=True)


def weights(inp, out, dtype, bias=True):
    return torch.randn(out, inp, 1, 1, dtype=dtype) / inp ** 0.5, torch.randn(out, dtype=dtype) if bias else None


# (inp, out, size): one pixel, a 7x7 plane (GhostNet's), a plane larger than a work item's
# scratch (256 KiB of rows at 64 x 67 floats per channel), odd counts
SHAPES = [(5, 3, (1, 1)), (16, 33, (7, 7)), (7, 40, (64, 67)), (3, 17, (2, 9))]


@pytest.mark.parametrize("shape, activation, bias, batch, channels_last",
                         list(itertools.product(SHAPES, ["relu", "none"], [True, False], [1, 3], [False, True])))
def test_matches_composition_float64(shape, activation, bias, batch, channels_last):
    inp, out, size = shape
    x = make_input(batch, inp, *size, channels_last=channels_last)
    w, b = weights(inp, out, torch.float64, bias)
    result = op(x, w, b, activation)
    assert result.shape == (batch, out, 1, 1) and result.is_contiguous()
    torch.testing.assert_close(result, expected(x, w, b, activation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_float32(batch):
    x = torch.randn(batch, 160, 7, 7)
    w, b = weights(160, 96, torch.float32)
    torch.testing.assert_close(op(x, w, b, "relu"), expected(x, w, b, "relu"), rtol=1e-5, atol=1e-6)


def test_opcheck_and_gradcheck():
    x = make_input(2, 6, 5, 4, requires_grad=True)
    w, b = (t.requires_grad_() for t in weights(6, 9, torch.float64))
    torch.library.opcheck(op.default, (x, w, b, "relu"))
    assert torch.autograd.gradcheck(lambda *a: op(*a, "relu"), (x, w, b))


@pytest.mark.parametrize("case, message", [
    ("3-D x", "x must be 4-D"),
    ("wrong weight", "weight must be"),
    ("wrong bias", "bias must have shape"),
    ("activation", "activation must be"),
])
def test_bad_arguments_are_named(case, message):
    x, (w, b), activation = torch.randn(1, 4, 3, 3), weights(4, 6, torch.float32), "relu"
    if case == "3-D x":
        x = x[0]
    elif case == "wrong weight":
        w = torch.randn(6, 5, 1, 1)
    elif case == "wrong bias":
        b = torch.randn(5)
    else:
        activation = "gelu"
    with pytest.raises((RuntimeError, ValueError), match=f"pointwise_conv2d_pool: {message}"):
        op(x, w, b, activation)


@pytest.mark.filterwarnings("ignore")  # torch.jit's deprecation and tracer warnings
def test_freeze_fuses_ghostnet_head():
    kinds = frozen_node_kinds(ghostkernels.accelerate(models.ghostnet_050().eval()), torch.randn(2, 3, 64, 64))
    assert kinds.count("ghostkernels::pointwise_conv2d_pool") == 1 and "aten::adaptive_avg_pool2d" not in kinds


class _Head(nn.Module):
    """A 1x1 conv, an optional ReLU (in place or not) and a pool, with the intermediate read
    elsewhere too when `reread`: fusing would then drop what the other reader sees."""

    def __init__(self, activation, reread=False, pool_size=1):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 1)
        self.activation, self.reread, self.pool_size = activation, reread, pool_size

    def forward(self, x):
        y = self.conv(x)
        if self.activation == "relu_":
            y = F.relu(y, inplace=True)
        elif self.activation == "relu":
            y = F.relu(y)
        pooled = F.adaptive_avg_pool2d(y, self.pool_size)
        return pooled.flatten(1) + y.amax((2, 3)) if self.reread else pooled


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("activation, reread, pool_size, fused", [
    ("relu_", False, 1, True), ("relu", False, 1, True), ("none", False, 1, True),
    ("relu_", True, 1, False), ("none", True, 1, False), ("relu", False, 2, False),
])
def test_fusion_only_where_it_keeps_the_meaning(activation, reread, pool_size, fused):
    model = ghostkernels.accelerate(_Head(activation, reread, pool_size).eval())
    x = torch.randn(1, 8, 6, 5)
    with torch.no_grad():
        graph = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False)).graph
    assert "ghostkernels::pointwise_conv2d" in [node.kind() for node in graph.nodes()]
    assert fuse_pointwise_pools(graph) == int(fused)
    frozen = ghostkernels.freeze(model, x)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-6)
