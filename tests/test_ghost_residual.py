"""ghostkernels::ghost_module_residual (a Ghost op and the in-place residual add after it) against
the reference, and freeze()'s rewrite that makes it."""

import itertools
import pickle

import pytest
import torch
from torch import nn

import ghostkernels
from ghostkernels import ghost_module_reference, models
from ghostkernels.ghost_residual import GhostBottleneckResidual, fuse_residual_adds
from ghostkernels.models.ghostnet import GhostBottleneck as ZooGhostBottleneck

from conftest import frozen_node_kinds, make_input, make_weights, needs_gpu, randomise_bn

op = torch.ops.ghostkernels.ghost_module_residual


def expected(x, scale, weights, oup, stride, activation, residual, alpha=1):
    ghost = ghost_module_reference(x if scale is None else x * scale, *weights, out_channels=oup, stride=stride,
                                   activation=activation)
    return ghost.add_(residual, alpha=alpha)


def residual_like(x, oup, stride, dtype=None, channels_last=None):
    height, width = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    r = torch.randn(x.shape[0], oup, height, width, dtype=dtype or x.dtype)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        if channels_last is None else channels_last
    return r.contiguous(memory_format=torch.channels_last) if cl else r


# (inp, oup, ratio, dw, size): odd oup, ratio 3-4, dw 1-7, several bands (37 x 70)
CONFIGS = [(16, 48, 2, 3, (37, 70)), (5, 13, 3, 5, (9, 11)), (6, 9, 4, 7, (12, 14)), (7, 10, 2, 1, (2, 1))]


@pytest.mark.parametrize("config, stride, activation, channels_last, scaled",
                         list(itertools.product(CONFIGS, [1, 2], ["relu", "none"], [False, True], [False, True])))
def test_matches_reference(config, stride, activation, channels_last, scaled):
    inp, oup, ratio, dw, size = config
    x = make_input(2, inp, *size, channels_last=channels_last)
    scale = torch.rand(2, inp, 1, 1, dtype=x.dtype) if scaled else None
    weights = make_weights(inp, oup, ratio, dw)
    residual = residual_like(x, oup, stride)
    out = op(x, scale, *weights, oup, stride, activation, residual)
    torch.testing.assert_close(out, expected(x, scale, weights, oup, stride, activation, residual),
                               rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("batch", [0, 1])
def test_float32_and_batch(batch):
    x = torch.randn(batch, 6, 23, 19)
    weights = make_weights(6, 12, 2, 3, dtype=torch.float32)
    residual = residual_like(x, 12, 1)
    out = op(x, None, *weights, 12, 1, "relu", residual)
    torch.testing.assert_close(out, expected(x, None, weights, 12, 1, "relu", residual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["broadcast", "alpha", "other_layout", "float32_into_float64"])
def test_residuals_the_kernel_does_not_fuse_follow_add_(case):
    """What the kernel does not add as it writes goes through add_ after it: the same result."""
    x = make_input(2, 5, 9, 8)
    weights = make_weights(5, 10, 2, 3)
    residual, alpha = residual_like(x, 10, 1), 1
    if case == "broadcast":
        residual = torch.randn(2, 10, 1, 1, dtype=x.dtype)
    elif case == "alpha":
        alpha = -0.5
    elif case == "other_layout":
        residual = residual_like(x, 10, 1, channels_last=True)
    else:
        residual = residual.float()
    out = op(x, None, *weights, 10, 1, "relu", residual, alpha)
    torch.testing.assert_close(out, expected(x, None, weights, 10, 1, "relu", residual, alpha), rtol=1e-12,
                               atol=1e-12)
    assert out.dtype == x.dtype


def test_residual_of_the_wrong_shape_is_refused_as_add_():
    x = make_input(1, 5, 9, 8)
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape|must match the size"):
        op(x, None, *make_weights(5, 10, 2, 3), 10, 1, "relu", torch.randn(1, 10, 9, 9, dtype=x.dtype))


@pytest.mark.parametrize("scaled", [False, True])
def test_gradcheck_and_opcheck(scaled):
    x = make_input(1, 4, 7, 6, requires_grad=True)
    scale = torch.rand(1, 4, 1, 1, dtype=x.dtype, requires_grad=True) if scaled else None
    weights = make_weights(4, 6, 2, 3, requires_grad=True)
    residual = residual_like(x, 6, 1).requires_grad_()
    args = (x, scale, *weights, 6, 1, "relu", residual)
    assert torch.autograd.gradcheck(op, args)
    torch.library.opcheck(op, args)


def test_frozen_ghostnet_runs_its_residual_adds_in_the_ghost_ops():
    torch.manual_seed(0)
    model = ghostkernels.accelerate(models.ghostnet_050(fused=False).eval())
    kinds = frozen_node_kinds(model, torch.randn(2, 3, 64, 64))
    assert kinds.count("ghostkernels::ghost_module_residual") == 16 and "aten::add_" not in kinds


class _GhostOutputReadTwice(nn.Module):
    """The Ghost output read before the in-place add: fusing the add would change what the
    other reader sees."""

    def __init__(self):
        super().__init__()
        self.ghost = ghostkernels.GhostModule(4, 8)

    def forward(self, x):
        y = self.ghost(x)
        before = y * 2
        y += x.repeat(1, 2, 1, 1)
        return y + before


@pytest.mark.filterwarnings("ignore")  # torch.jit's deprecation and tracer warnings
def test_ghost_output_with_another_reader_is_left_alone():
    model = ghostkernels.accelerate(_GhostOutputReadTwice().eval())
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        graph = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False)).graph
    assert "ghostkernels::ghost_module" in [node.kind() for node in graph.nodes()]
    assert fuse_residual_adds(graph) == 0
    frozen = ghostkernels.freeze(model, x)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-6)


# -- accelerate(): the residual adds of eager bottlenecks (GhostBottleneckResidual) --------------


def _ops_run(model, x):
    """The names of the ops a no-grad forward of model on x runs (the profiler's events)."""
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(x)
    return [event.name for event in profile.events()]


def test_accelerated_ghostnet_adds_every_residual_in_ghost2s_op():
    """Every bottleneck of GhostNet 0.5x (stride 1 and 2, with and without SE, identity and conv
    shortcuts) keeps its children, keys and attributes and runs ghost2 and the add as one op:
    the original's outputs and input gradients, NCHW and channels_last, and after pickling."""
    model = randomise_bn(models.ghostnet_050(fused=False), spread=0.2).eval().double()
    fast = ghostkernels.accelerate(model)
    blocks = {name: m for name, m in fast.named_modules() if isinstance(m, GhostBottleneckResidual)}
    assert len(blocks) == 16 and fast.acceleration_summary.residual == list(blocks)
    assert list(fast.state_dict()) == list(ghostkernels.accelerate(model, check=False).state_dict())
    assert {block.stride for block in blocks.values()} == {1, 2}  # the blocks' plain attributes
    for channels_last in (False, True):
        x = make_input(2, 3, 33, 47, channels_last=channels_last, requires_grad=True)
        expected = model(x)
        out = fast(x)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
        (expected_grad,), (grad,) = torch.autograd.grad(expected.sum(), x), torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9 * expected_grad.abs().max().item())
    ran = _ops_run(fast, x)
    assert ran.count("ghostkernels::ghost_module_residual") == 16 and "aten::add_" not in ran
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(fast))(x), fast(x), rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_accelerated_ghostnet_on_cuda_adds_its_residuals_in_the_triton_stores(dtype):
    """The same on a GPU, channels_last: float32 (TF32 off) within 1e-4 of the original, float16 within
    twice eager float16's error against float32."""
    model = randomise_bn(models.ghostnet_050(fused=False), spread=0.2).eval().cuda()
    fast = ghostkernels.accelerate(model).to(dtype)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    allow_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            exact = model(x)
            out = fast(x.to(dtype)).float()
            eager = model.to(dtype)(x.to(dtype)).float()
        ran = _ops_run(fast, x.to(dtype))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    assert ran.count("ghostkernels::ghost_module_residual") == 16 and "aten::add_" not in ran
    error = ((out - exact).norm() / exact.norm()).item()
    bound = 1e-4 if dtype is torch.float32 else 2 * ((eager - exact).norm() / exact.norm()).item()
    assert error <= bound, f"{dtype}: {error:.3g} (bound {bound:.3g})"


class GhostBottleneck(ZooGhostBottleneck):
    """The zoo's block's name and children with another forward: a ReLU after the add."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_block_of_the_same_name_computing_otherwise_is_left_to_its_forward():
    """Only a probe of the block shows what its forward computes: the self-check keeps such a block,
    and check=False fuses no block."""
    model = randomise_bn(nn.Sequential(GhostBottleneck(8, 16, 8)), spread=0.2).eval().double()
    x = make_input(2, 8, 9, 9)
    with torch.no_grad():
        expected = model(x)
    for check in (True, False):
        fast = ghostkernels.accelerate(model, check=check)
        summary = fast.acceleration_summary
        assert type(fast[0]) is GhostBottleneck and not summary.residual
        assert ("self-check" in dict(summary.skipped)["0"]) if check else \
            dict(summary.skipped)["1 GhostNet bottlenecks"].endswith("computes what the fused one does")
        with torch.no_grad():
            torch.testing.assert_close(fast(x), expected, rtol=1e-9, atol=1e-12)


def _block(se_ratio):
    return randomise_bn(ZooGhostBottleneck(8, 16, 8, se_ratio=se_ratio), spread=0.2).double()


@pytest.mark.parametrize("se_ratio", [0.0, 0.25])
@pytest.mark.parametrize("hooked", ["ghost2", "shortcut"])
def test_hooks_on_ghost2_or_the_shortcut_run_in_the_original_order(hooked, se_ratio):
    """Hooks registered after accelerate(): the fused op would skip ghost2's and run the shortcut's
    before ghost2's layers; the block runs its layers in turn instead, hooks in the original order."""
    model = _block(se_ratio).eval()
    fast = ghostkernels.accelerate(model)
    assert type(fast) is GhostBottleneckResidual
    x = make_input(2, 8, 9, 9)
    results = []
    for net in (model, fast):
        calls = []
        handles = [getattr(net, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
                   for name in ("ghost2", "shortcut")]
        getattr(net, hooked).register_forward_hook(lambda m, i, o: o * 2)
        with torch.no_grad():
            results.append((net(x), calls))
        for handle in handles:
            handle.remove()
    (expected, expected_calls), (out, calls) = results
    assert calls == expected_calls == ["ghost2", "shortcut"]
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


def test_training_mode_runs_the_layers():
    """A block without folded BNs trains after an eval-mode accelerate(): its layers in the
    original order, batch statistics and running statistics as the original's."""
    model = _block(0.0).eval()
    fast = ghostkernels.accelerate(model)
    assert type(fast) is GhostBottleneckResidual
    model.train(), fast.train()
    x = make_input(4, 8, 9, 9)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.state_dict(), model.state_dict(), rtol=1e-12, atol=1e-14)
