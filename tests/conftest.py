import contextlib
import copy
import functools
import os
import zlib

import pytest
import torch
import torch.utils.checkpoint

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. Triton reads
# this when a kernel is decorated, so it must be set before ghostkernels.triton_ghost loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ghostkernels  # noqa: E402


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: pytest without it ignores this
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 8 (each holds torch, Triton and its own compiled models)."""
    return min(available_cores(), 8)


# Under pytest-xdist a worker's intra-op threads are its share of the cores: 2 workers of 2 threads
# on 2 cores made OpenMP's spinning threads wait on each other, slower than one process. The C++
# kernels' splits over several threads have tests that set their thread count (intra_op_threads);
# the processes that tests start inherit the share through OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    WORKER_THREADS = max(1, available_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)
    torch.set_num_threads(WORKER_THREADS)

# The C++ kernels' argument checks raise RuntimeError (TORCH_CHECK); without the C++ library (a GPU
# machine runs the tests with GHOSTKERNELS_DISABLE_CPP=1) the fallbacks run the fake kernels'
# Python checks, which raise ValueError or TypeError with the same words.
CPP_LIBRARY = ghostkernels._backends.load_cpu_extension()[0] == "cpp"
BAD_ARGUMENT = RuntimeError if CPP_LIBRARY else (ValueError, TypeError)
# Tests of what only the C++ library has (its output cache, its builds); test_ops.py's
# test_cpu_kernel_is_in_use fails, not skips, where the library is missing.
needs_cpp_library = pytest.mark.skipif(not CPP_LIBRARY, reason="the C++ library is not loaded")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
# torch 2.6 to 2.9 pin Triton 3.2 to 3.5, whose interpreters fail our kernels and which the package
# does not use (backends() says so): there the tests that run the kernels skip, saying why. Beside a
# newer torch an old Triton is not expected, and they fail.
_TRITON_VERSION = ghostkernels._backends._installed_triton_version()
_TRITON_TOO_OLD = bool(TORCH_RELEASE < (2, 10) and _TRITON_VERSION and ghostkernels._backends._triton_too_old(_TRITON_VERSION))
needs_triton_kernels = pytest.mark.skipif(_TRITON_TOO_OLD, reason=f"torch {torch.__version__} pins Triton {_TRITON_VERSION}, "
                                          "older than the 3.6 the kernels need: the package does not use them")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@contextlib.contextmanager
def intra_op_threads(count):
    """torch's intra-op thread count set to `count` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many calls on tiny tensors (gradgradcheck, small
    networks): OpenMP's synchronisation costs more than the work there, and much more when
    the 2 cores are shared. Restored afterwards."""
    with intra_op_threads(1):
        yield


def make_weights(inp, oup, ratio, dw, kernel=1, dtype=torch.float64, requires_grad=False, bias=True):
    """Random folded weights (W1, b1, W2, b2) of a Ghost module."""
    init = ghostkernels.ops.intrinsic_channels(oup, ratio)
    new = init * (ratio - 1)
    tensors = [
        torch.randn(init, inp, kernel, kernel, dtype=dtype) / (inp * kernel * kernel) ** 0.5,
        torch.randn(init, dtype=dtype) if bias else None,
        torch.randn(new, 1, dw, dw, dtype=dtype) / dw,
        torch.randn(new, dtype=dtype) if bias else None,
    ]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]


def make_input(n, c, h, w, channels_last=False, dtype=torch.float64, requires_grad=False):
    x = torch.randn(n, c, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def module_output_shapes(net, x):
    """(net(x), {name: output shape} of every module of `net` that the forward calls), by forward
    hooks on all of them (what a summary tool does), removed afterwards."""
    shapes = {}

    def record(module, args, out, name):
        shapes.setdefault(name, out.shape)

    handles = [m.register_forward_hook(functools.partial(record, name=name)) for name, m in net.named_modules()]
    try:
        return net(x), shapes
    finally:
        for handle in handles:
            handle.remove()


def perturbed(module, seed=0):
    """A copy of `module` with other weights and BN statistics: a replacement whose effect shows."""
    generator, copied = torch.Generator().manual_seed(seed), copy.deepcopy(module)
    with torch.no_grad():
        for tensor in [*copied.parameters(), *copied.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
    return copied


def randomise_bn(model, spread=1.0):
    """Non-trivial BN statistics and affine parameters, so that folding is really exercised.
    Deep networks want a small spread, or activations grow layer after layer."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-spread, spread)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-spread / 2, spread / 2)
    return model


def assert_checkpointed_statistics_as_eager(original, ours, x, reentrant):
    """One training step of each under torch.utils.checkpoint leaves ours the original's buffers.
    The recomputation runs a segment's BNs again and eager updates their running statistics a
    second time; non-reentrant checkpointing stops recomputing at the segment's last saved tensor,
    so an op of ours must update them before it saves its tensors."""
    for module in (original, ours):
        out = torch.utils.checkpoint.checkpoint(module, x.clone().requires_grad_(), use_reentrant=reentrant)
        out.square().sum().backward()
    for (name, expected), actual in zip(original.named_buffers(), ours.buffers()):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=name)


def training_results(model, x, dropout_seed=1, check=True):
    """Outputs and parameter gradients (of out.square().sum()) of a training-mode `model` on x:
    {"eager", "accelerated", "float64", "accelerated float64"} -> (out, {name: grad}), and the
    accelerated float64 model (accelerate(..., check=check)). The same dropout masks in all four
    (dropout_seed)."""
    exact = copy.deepcopy(model).double()
    fast, fast_exact = (ghostkernels.accelerate(m, check=check) for m in (model, copy.deepcopy(exact)))
    results = {}
    for name, m, xi in (("eager", model, x), ("accelerated", fast, x), ("float64", exact, x.double()),
                        ("accelerated float64", fast_exact, x.double())):
        torch.manual_seed(dropout_seed)
        out = m(xi)
        params = dict(m.named_parameters())
        results[name] = out, dict(zip(params, torch.autograd.grad(out.square().sum(), list(params.values()))))
    return results, fast_exact


def assert_training_like_eager(results):
    """training_results' float32 output against the model in float64 within eager float32's
    limits (assert_float32_like_eager), and the gradients of the accelerated model in float64
    against the model's in float64. Gradients are compared in float64 because in float32 they
    test the seed, not the kernels: ReLU masks that flip near zero and batch-statistics BNs over
    a few values per channel put eager float32's gradients and ours alike 1e-4 to 0.17 off
    float64, either one the worse by up to 150x, seed by seed (timm V2 over 12 seeds; GhostNet
    0.5x at 32x32 over 16: one flip, 2.3e-4 eager against 3.4e-2 ours, 6e-13 in float64)."""
    assert_float32_like_eager([results["accelerated"][0]], [results["eager"][0]], [results["float64"][0]], 1e-5)
    exact_grads, fast_grads = results["float64"][1], results["accelerated float64"][1]
    assert sorted(fast_grads) == sorted(exact_grads)  # same names (the order may differ)
    largest = max(g.abs().max().item() for g in exact_grads.values())
    for name, expected in exact_grads.items():
        # 1e-9: float64 in another summation order (6e-11 at worst over 16 seeds of GhostNet 0.5x
        # and 3 seeds of timm's six models); relative to the tensor's largest value, at least
        # 1e-2 of the largest of all (a conv bias before a batch-statistics BN has a zero gradient)
        scale = max(expected.abs().max().item(), 1e-2 * largest)
        err = (fast_grads[name] - expected).abs().max().item() / scale
        assert err <= 1e-9, f"{name}: relative error {err:.3g}"


def frozen_node_kinds(model, x):
    """The node kinds of freeze(model, x)'s graph, after checking that the frozen model gives
    the model's outputs on x (float32 tolerance)."""
    frozen = ghostkernels.freeze(model, x)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-6)
    return [node.kind() for node in frozen.graph.graph.nodes()]


def assert_float32_like_eager(found, eager, exact, tol, floor_fraction=1e-3, names=None):
    """Float32 results `found` (accelerated) and `eager` against `exact` (the same computation in
    float64): every tensor of found within tol, or within twice eager float32's worst error where
    that is larger. Errors are relative to the tensor's largest exact value, at least
    floor_fraction of the largest of all. A tensor that is zero in exact arithmetic (a conv
    bias before a training-mode BN has a zero gradient) is float32 rounding noise of terms as
    large as the others, in any order of summation: its error is taken relative to the largest
    of all (against the floor it was noise against noise: the accelerated GhostNets' gradients
    passed twice eager's error for only 9-10 of 12 seeds). Worst over the set, not tensor by tensor: two float32 computations in
    different orders land on different tensors' noise."""
    largest = max(e.abs().max().item() for e in exact)
    floor = floor_fraction * largest
    names = names or [str(i) for i in range(len(exact))]

    def scale(e):
        value = e.abs().max().item()
        return largest if value <= 1e-9 * largest else max(value, floor)

    def errors(results):
        return [(r.double() - e).abs().max().item() / scale(e) for r, e in zip(results, exact)]

    found_errors, eager_worst = errors(found), max(errors(eager))
    worst = max(range(len(exact)), key=found_errors.__getitem__)
    assert found_errors[worst] <= max(tol, 2 * eager_worst), (
        f"{names[worst]}: relative error {found_errors[worst]:.3g} (eager float32's worst: {eager_worst:.3g})")
