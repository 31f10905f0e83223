"""ghostkernels::batch_norm_train and TrainingBatchNorm2d against nn.BatchNorm2d in training mode:
outputs, grads of x, weight and bias, running statistics; the fallbacks; what accelerate() swaps."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ghostkernels
from ghostkernels import models
from ghostkernels.models.plain import ResNetCIFAR
from ghostkernels import batch_norm
from ghostkernels.batch_norm import TrainingBatchNorm2d, _backward_fake, _backward_fallback, _fallback, _fake

from conftest import assert_checkpointed_statistics_as_eager, intra_op_threads, make_input, needs_cpp_library

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def kernel_for_every_map(monkeypatch):
    """The test's small maps on the kernel, which the module leaves to nn.BatchNorm2d below
    SMALLEST_KERNEL_MAP elements."""
    monkeypatch.setattr(batch_norm, "SMALLEST_KERNEL_MAP", 0)


def pair(channels, dtype=torch.float64, **config):
    """(nn.BatchNorm2d, TrainingBatchNorm2d of a copy) with random affine parameters and statistics."""
    original = nn.BatchNorm2d(channels, dtype=dtype, **config)
    with torch.no_grad():
        if original.affine:
            original.weight.uniform_(0.5, 1.5)
            original.bias.uniform_(-0.5, 0.5)
        if original.track_running_stats:
            original.running_mean.uniform_(-1, 1)
            original.running_var.uniform_(0.5, 1.5)
    return original, TrainingBatchNorm2d.from_batch_norm(copy.deepcopy(original))


def assert_close(actual, expected, tol, name):
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def assert_same_steps(original, ours, x, steps=1):
    """Fresh inputs like x, `steps` times: output, grads of x, weight, bias, and the buffers agree."""
    tol = TOLERANCE[x.dtype]
    for _ in range(steps):
        x = (torch.randn_like(x) * 2 + 0.5).requires_grad_()
        grad = torch.randn_like(x)
        results = []
        for module in (original, ours):
            module.zero_grad(set_to_none=True)
            xi = x.detach().clone().requires_grad_()
            out = module(xi)
            out.backward(grad)
            results.append((out, xi.grad, module))
        (expected, expected_gx, _), (out, gx, _) = results
        assert out.is_contiguous(memory_format=torch.channels_last if x.is_contiguous(
            memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format)
        assert_close(out, expected, tol, "out")
        assert_close(gx, expected_gx, tol, "grad of x")
        for (name, p), q in zip(ours.named_parameters(), original.parameters()):
            assert_close(p.grad, q.grad, tol, name)
        for (name, b), c in zip(ours.named_buffers(), original.buffers()):
            if b.is_floating_point():
                assert_close(b, c, tol, name)
            else:
                assert torch.equal(b, c), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, threads", [((4, 16, 8, 8), 1), ((3, 5, 7, 9), 1), ((1, 3, 3, 1), 1),
                                            ((2, 33, 5, 3), 1), ((3, 5, 7, 9), 2), ((2, 33, 5, 3), 3)])
def test_matches_batch_norm(dtype, shape, threads):
    """threads: the planes split over intra-op threads, evenly or not."""
    original, ours = pair(shape[1], dtype)
    with intra_op_threads(threads):
        assert_same_steps(original.train(), ours.train(), make_input(*shape, dtype=dtype), steps=2)


@pytest.mark.parametrize("config", [dict(momentum=None), dict(momentum=0.7), dict(eps=0.25),
                                    dict(track_running_stats=False)], ids=str)
def test_batch_norm_settings(config):
    original, ours = pair(6, **config)
    assert_same_steps(original.train(), ours.train(), make_input(2, 6, 5, 5), steps=3)
    # eval: running statistics (or, without them, the batch's again)
    assert_same_steps(original.eval(), ours.eval(), make_input(2, 6, 5, 5))


@pytest.mark.parametrize("x, reason", [
    (lambda: make_input(2, 6, 5, 5).contiguous(memory_format=torch.channels_last), "channels_last"),
    (lambda: make_input(0, 6, 5, 5), "batch 0"),
    (lambda: make_input(2, 6, 5, 5)[:, :, :, 1:], "not contiguous"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_other_inputs_run_batch_norm(x, reason):
    original, ours = pair(6)
    x = x()
    assert not ours._kernel_applies(x), reason
    if x.numel():
        assert_same_steps(original.train(), ours.train(), x)
    else:
        assert ours(x).shape == original(x).shape


@needs_cpp_library
def test_small_maps_run_batch_norm(monkeypatch):
    monkeypatch.setattr(batch_norm, "SMALLEST_KERNEL_MAP", 1 << 17)
    _, ours = pair(16, torch.float32)
    assert not ours._kernel_applies(make_input(8, 16, 31, 31, dtype=torch.float32))
    assert ours._kernel_applies(make_input(8, 16, 32, 32, dtype=torch.float32))


def test_no_affine_runs_batch_norm():
    original, ours = pair(6, affine=False)
    assert not ours._kernel_applies(make_input(2, 6, 5, 5))
    assert_same_steps(original.train(), ours.train(), make_input(2, 6, 5, 5))


def test_one_value_per_channel_raises_like_batch_norm():
    original, ours = pair(4)
    for module in (original, ours):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module(make_input(1, 4, 1, 1))


def test_shares_parameters_and_buffers():
    original = nn.BatchNorm2d(5)
    ours = TrainingBatchNorm2d.from_batch_norm(original)
    assert ours.weight is original.weight and ours.bias is original.bias
    assert ours.running_mean is original.running_mean and ours.num_batches_tracked is original.num_batches_tracked
    assert list(ours.state_dict()) == list(original.state_dict())
    assert isinstance(ours, nn.BatchNorm2d)


def _op_arguments(dtype=torch.float64, requires_grad=True, shape=(3, 4, 5, 6)):
    x = (make_input(*shape, dtype=dtype) * 2 + 1).requires_grad_(requires_grad)
    weight = torch.empty(shape[1], dtype=dtype).uniform_(0.5, 1.5).requires_grad_(requires_grad)
    bias = torch.randn(shape[1], dtype=dtype).requires_grad_(requires_grad)
    return [x, weight, bias, 1e-5]


def test_gradcheck(one_thread):
    args = _op_arguments()

    def output(x, weight, bias):
        return torch.ops.ghostkernels.batch_norm_train(x, weight, bias, 1e-5)[0]
    assert torch.autograd.gradcheck(output, args[:3])
    assert torch.autograd.gradgradcheck(output, args[:3])


def test_autograd_kernel_where_torch_has_no_any_requires_grad(monkeypatch):
    """torch 2.6 has no torch._C._any_requires_grad (every op with running statistics raised
    AttributeError there): the Python check decides the same, input by input."""
    from ghostkernels import ops
    monkeypatch.setattr(ops, "_any_requires_grad", ops._any_tensor_requires_grad)
    x, weight, bias, eps = _op_arguments()
    for wants_grad in ([x], [weight], [bias], []):
        args = [t.detach().requires_grad_(any(t is w for w in wants_grad)) for t in (x, weight, bias)]
        out = torch.ops.ghostkernels.batch_norm_train(*args, eps)[0]
        assert out.requires_grad == bool(wants_grad)
        if wants_grad:
            out.backward(torch.ones_like(out))
            assert [a.grad is not None for a in args] == [a.requires_grad for a in args]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "channels_last 1x1", "running_statistics"])
def test_opcheck(layout):
    """The kernels' output strides are the fake kernels' for every layout of x; with running
    statistics, their mutation is what the schema declares."""
    args = _op_arguments(shape=(3, 4, 1, 1) if layout.endswith("1x1") else (3, 4, 5, 6))
    x = args[0].detach()
    if layout.startswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        x = x[:, :, :, 1:]
    args[0] = x.requires_grad_()
    running = [torch.randn(4, dtype=x.dtype), torch.rand(4, dtype=x.dtype) + 0.5, 0.2]
    torch.library.opcheck(torch.ops.ghostkernels.batch_norm_train.default,
                          args + running if layout == "running_statistics" else args)
    x, weight, _, eps = args
    _, mean, var = torch.ops.ghostkernels.batch_norm_train(*args)
    backward_args = [torch.randn_like(x), x.detach(), weight.detach(), mean.detach(), var.detach(), eps]
    torch.library.opcheck(torch.ops.ghostkernels.batch_norm_train_backward.default, backward_args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_match_their_compositions(dtype):
    args = _op_arguments(dtype, requires_grad=False, shape=(5, 7, 9, 4))
    out, mean, var = torch.ops.ghostkernels.batch_norm_train(*args)
    for a, b in zip((out, mean, var), _fallback(*args)):
        assert_close(a, b, TOLERANCE[dtype], "forward")
    backward_args = [torch.randn_like(out), args[0], args[1], mean, var, args[3]]
    for a, b in zip(torch.ops.ghostkernels.batch_norm_train_backward(*backward_args),
                    _backward_fallback(*backward_args)):
        assert_close(a, b, TOLERANCE[dtype], "backward")


@needs_cpp_library
def test_float32_statistics_of_equal_values_as_exact_as_eager():
    """A ReLU'd map (half its values one number) on large planes: each addition of an equal term
    rounds alike, and float32 sums along a plane's lanes (1251 additions a lane at 144 x 139)
    put the variance 7e-6 off (8e-6 in ghost_module_train's cheap BN: 10x eager's error; its CPU
    BN sums in double). Sums by chunks of 8 vectors, widened to double: within 1e-6, as eager."""
    x = F.relu(torch.randn(2, 3, 144, 139)) * -1.04
    exact = x.double().var((0, 2, 3), unbiased=False)
    _, mean, var = torch.ops.ghostkernels.batch_norm_train(x, torch.ones(3), torch.zeros(3), 1e-5)
    assert ((var.double() - exact).abs() / exact).max() < 1e-6
    assert ((mean.double() - x.double().mean((0, 2, 3))).abs() / exact.sqrt()).max() < 1e-6


@pytest.mark.parametrize("entry", ["op", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_updates_the_running_statistics_as_batch_norm(entry, dtype):
    """The running statistics given to the op move in place as F.batch_norm moves them."""
    args = _op_arguments(dtype, requires_grad=False, shape=(5, 7, 9, 4))
    running = [torch.randn(7, dtype=dtype), torch.rand(7, dtype=dtype) + 0.5]
    expected = [t.clone() for t in running]
    kernel = torch.ops.ghostkernels.batch_norm_train if entry == "op" else _fallback
    kernel(*args, *running, 0.3)
    F.batch_norm(args[0], *expected, training=True, momentum=0.3)
    for name, got, want in zip(("running_mean", "running_var"), running, expected):
        assert_close(got, want, TOLERANCE[dtype], name)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_updates_the_statistics_as_eager(reentrant):
    """A checkpointed segment ending in the BN: its statistics updated twice, as eager's."""
    original, ours = pair(6)
    assert_checkpointed_statistics_as_eager(original, ours, make_input(3, 6, 5, 5), reentrant)


@pytest.mark.parametrize("index, change, match", [
    (1, lambda t: t[:-1], "weight must have shape"),
    (2, lambda t: t.float(), "bias is (torch.float32|Float) on cpu, x is"),
    (0, lambda t: t[0], "4-D"),
    (0, lambda t: t[:1, :, :1, :1], "more than 1 value per channel"),
    (4, lambda t: t[:-1], r"running_mean must have shape \(4,\)"),
    (5, lambda t: None, "running_mean and running_var must both be given or both be None"),
])
def test_bad_arguments_are_named(index, change, match):
    """The fake kernel (what torch.compile runs) and the C++ kernel name the argument."""
    args = _op_arguments(requires_grad=False) + [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                                                 0.1]
    args[index] = change(args[index])
    for op in (_fake, torch.ops.ghostkernels.batch_norm_train):
        with pytest.raises(RuntimeError, match=match):
            op(*args)


def test_backward_checks_grads_shape():
    args = _op_arguments(requires_grad=False)
    out, mean, var = torch.ops.ghostkernels.batch_norm_train(*args)
    backward_args = (torch.randn_like(out)[:, :, 1:], args[0], args[1], mean, var, args[3])
    for entry in (torch.ops.ghostkernels.batch_norm_train_backward, _backward_fallback, _backward_fake):
        with pytest.raises(RuntimeError, match="grad must have x's shape"):
            entry(*backward_args)


def test_compile_trains_like_eager():
    original, ours = pair(6, torch.float32)
    compiled = torch.compile(ours.train(), backend="aot_eager")
    assert_same_steps(original.train(), compiled, make_input(2, 6, 7, 7, dtype=torch.float32), steps=2)


def _accelerated(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ghostkernels.accelerate(model)


def test_accelerate_swaps_the_batch_norms_outside_ghost_modules():
    """A training-mode Ghost-ResNet: its blocks' BNs (not the Ghost modules' own) become
    TrainingBatchNorm2d, with the same keys and Parameter objects; eval-mode accelerate folds them."""
    model = ghostkernels.ghostify(models.resnet56_cifar()).train()
    fast = _accelerated(model)
    swapped = [name for name, m in fast.named_modules() if type(m) is TrainingBatchNorm2d]
    assert swapped == fast.acceleration_summary.batch_norms
    assert "bn1" in swapped and "layer1.0.bn2" in swapped
    assert not any(".primary_conv." in name or ".cheap_operation." in name for name in swapped)
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (model, fast):
        m.zero_grad(set_to_none=True)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert not _accelerated(model.eval()).acceleration_summary.batch_norms


def test_eval_mode_accelerate_folds_them():
    """A model accelerated for training, then put in eval mode and accelerated again, folds its
    TrainingBatchNorm2d layers as it folds nn.BatchNorm2d."""
    model = ResNetCIFAR(blocks_per_stage=1).train()
    trained = _accelerated(model)
    assert "layer1.0.bn1" in trained.acceleration_summary.batch_norms
    folded = _accelerated(trained.eval()).acceleration_summary.folded
    assert folded == _accelerated(model.eval()).acceleration_summary.folded != []


def test_accelerate_inplace_keeps_the_optimiser_working():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ghostkernels.accelerate(model, inplace=True)
    assert type(model[1]) is TrainingBatchNorm2d
    before = model[1].weight.detach().clone()
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    optimiser.step()
    assert not torch.equal(model[1].weight, before)


def test_sync_batch_norm_conversion_replaces_them():
    """convert_sync_batchnorm turns TrainingBatchNorm2d (an nn.BatchNorm2d) into PyTorch's
    SyncBatchNorm with the same parameters and keys, as it does nn.BatchNorm2d."""
    model = _accelerated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())
    keys = list(model.state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1]) is nn.SyncBatchNorm
    assert list(synced.state_dict()) == keys
