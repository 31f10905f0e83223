"""Double backward (create_graph=True: gradient penalties, Hessian-vector products) of the fused
ops: gradgradcheck in float64, and a gradient penalty through GhostModule against PyTorch's own
modules. The plain backward must keep the fused backward kernel."""

import itertools
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ghostkernels
from ghostkernels import GhostModule, ghost_module
from ghostkernels.reference import ReferenceGhostModule

from conftest import make_input, make_weights, randomise_bn


pytestmark = pytest.mark.usefixtures("one_thread")


def gradgradcheck(fn, inputs):
    """torch.autograd.gradgradcheck, failing on any warning (the autograd-not-implemented
    fallback only warns and returns zeros)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("activation, stride, bias, kernel",
                         list(itertools.product(["relu", "none"], [1, 2], [True, False], [1, 3])))
def test_ghost_module(activation, stride, bias, kernel):
    oup = 5  # init 3, cheap 3: the last cheap channel is sliced off
    x = make_input(1, 3, 5, 4, requires_grad=True)
    weights = make_weights(3, oup, 2, 3, kernel, requires_grad=True, bias=bias)

    def fn(x, w1, b1, w2, b2):
        return ghost_module(x, w1, b1, w2, b2, out_channels=oup, stride=stride, activation=activation)

    assert gradgradcheck(fn, (x, *weights))


@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_module_some_inputs(channels_last):
    """Only some inputs require grad (x not): the second derivatives of those."""
    x = make_input(1, 4, 6, 5, channels_last=channels_last)
    w1, b1, w2, b2 = make_weights(4, 7, 3, 3, requires_grad=True)
    b1.requires_grad_(False)

    def fn(w1, w2, b2):
        return ghost_module(x, w1, b1, w2, b2, out_channels=7, activation="relu")

    assert gradgradcheck(fn, (w1, w2, b2))


@pytest.mark.parametrize("activation, stride", [("relu", 1), ("none", 2)])
def test_ghost_module_gated(activation, stride):
    x = make_input(2, 3, 6, 5, requires_grad=True)
    weights = make_weights(3, 5, 2, 3, requires_grad=True)
    gate = torch.randn(2, 5, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, w1, b1, w2, b2, gate):
        return ghost_module(x, w1, b1, w2, b2, out_channels=5, stride=stride, activation=activation, gate=gate)

    assert gradgradcheck(fn, (x, *weights, gate))


@pytest.mark.parametrize("activation, depthwise_stride", [("relu", 2), ("none", 1)])
def test_ghost_module_depthwise(activation, depthwise_stride):
    x = make_input(1, 3, 6, 5, requires_grad=True)
    weights = make_weights(3, 5, 2, 3, requires_grad=True)
    w3 = (torch.randn(5, 1, 3, 3, dtype=torch.float64) / 3).requires_grad_()
    b3 = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(x, w1, b1, w2, b2, w3, b3):
        return torch.ops.ghostkernels.ghost_module_depthwise(x, w1, b1, w2, b2, 5, 1, activation, w3, b3,
                                                             depthwise_stride)

    assert gradgradcheck(fn, (x, *weights, w3, b3))


@pytest.mark.parametrize("activation", ["relu", "none"])
def test_ghost_module_scaled(activation):
    x = make_input(2, 4, 5, 5, requires_grad=True)
    scale = torch.rand(2, 4, 1, 1, dtype=torch.float64).add_(0.5).requires_grad_()
    weights = make_weights(4, 6, 2, 3, requires_grad=True)

    def fn(x, scale, w1, b1, w2, b2):
        return torch.ops.ghostkernels.ghost_module_scaled(x, scale, w1, b1, w2, b2, 6, 1, activation)

    assert gradgradcheck(fn, (x, scale, *weights))


def test_squeeze_excite_gate():
    x = make_input(2, 6, 3, 4, requires_grad=True)
    # Small expand weights keep the hard sigmoid's input inside (-3, 3), away from its kinks.
    weights = (torch.randn(3, 6, 1, 1, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
               torch.randn(6, 3, 1, 1, dtype=torch.float64) / 4, torch.randn(6, dtype=torch.float64) / 4)
    weights = [t.requires_grad_() for t in weights]
    assert gradgradcheck(torch.ops.ghostkernels.squeeze_excite_gate, (x, *weights))


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv2d(bias):
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, weight, b) if bias else (x, weight)
    assert gradgradcheck(lambda x, w, b=None: torch.ops.ghostkernels.pointwise_conv2d(x, w, b), inputs)


def penalty_gradients(module, x, params):
    """Gradients of a gradient penalty: ||d sum(out^2) / dx||^2 in the parameters and x."""
    out = module(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    return torch.autograd.grad(grad_x.square().sum(), [x, *params])


@pytest.mark.parametrize("relu, kernel, stride", [(True, 1, 1), (True, 3, 2), (False, 3, 1)])
def test_gradient_penalty_through_ghost_module(relu, kernel, stride):
    fused = randomise_bn(GhostModule(4, 7, kernel, ratio=3, dw_size=3, stride=stride, relu=relu)).double().eval()
    plain = ReferenceGhostModule(4, 7, kernel, ratio=3, dw_size=3, stride=stride, relu=relu).double().eval()
    plain.load_state_dict(fused.state_dict())
    x = make_input(2, 4, 7, 6, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = penalty_gradients(fused, x, list(fused.parameters()))
    expected = penalty_gradients(plain, x, list(plain.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in got)


def test_hessian_vector_product_through_accelerated_ghostnet():
    """Input Hessian-vector products through an accelerated GhostNet in eval (its merged ops:
    ghost_module, ghost_module_depthwise, ghost_module_scaled, squeeze_excite_gate,
    direct_conv2d, pointwise_conv2d) against the model it came from."""
    from ghostkernels.models import ghostnet_050

    model = randomise_bn(ghostnet_050(num_classes=4, fused=False), spread=0.2).double().eval()
    fast = ghostkernels.accelerate(model)
    x = make_input(1, 3, 32, 32, requires_grad=True)
    vector = torch.randn_like(x)

    def hvp(net):
        (grad_x,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad((grad_x * vector).sum(), x)[0]

    expected = hvp(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hvp(fast)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert got.abs().sum() > 0


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_plain_backward_keeps_the_fused_kernel():
    x = make_input(1, 4, 6, 5, requires_grad=True)
    weights = make_weights(4, 7, 3, 3, requires_grad=True)
    out = ghost_module(x, *weights, out_channels=7)
    with OpNames() as mode:
        torch.autograd.grad(out.sum(), [x, *weights], retain_graph=True)
    assert "ghostkernels::ghost_module_backward" in mode.names
    with OpNames() as mode:
        grads = torch.autograd.grad(out.sum(), [x, *weights], create_graph=True)
    assert "ghostkernels::ghost_module_backward" not in mode.names
    assert all(g.requires_grad for g in grads)
