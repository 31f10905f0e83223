"""Training mode: ghostkernels::ghost_module_train (batch-statistics BN inside the fused op)
against the original module (conv, nn.BatchNorm2d, ReLU, depthwise conv, nn.BatchNorm2d, ReLU,
cat, slice): outputs, gradients of x and of every parameter, running statistics."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ghostkernels import GhostModule, GhostModuleV2, ghost_train
from ghostkernels.ghost_train import _backward_fake, _backward_fallback, _fake, ghost_module_train_reference
from ghostkernels.reference import ReferenceGhostModule, ReferenceGhostModuleV2, output_memory_format

import distributed_training
from conftest import (BAD_ARGUMENT, CPP_LIBRARY, assert_checkpointed_statistics_as_eager, intra_op_threads,
                      make_input, randomise_bn)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def pair(dtype=torch.float64, original_class=ReferenceGhostModule, ours_class=GhostModule, bn=None, **config):
    """(original, ours) with the same random weights and BN state; `bn(module)` edits every BN of both."""
    original, ours = original_class(**config).to(dtype), ours_class(**config).to(dtype)
    randomise_bn(original)
    ours.load_state_dict(original.state_dict(), strict=True)
    for module in (original, ours):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and bn is not None:
                bn(m)
    return original.train(), ours.train()


def assert_close_relative(actual, expected, tol, scale=None, name=""):
    """Within tol of `expected` relative to its largest magnitude (or to `scale`)."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda m: f"{name}: {m}")


def step(module, x, grad=None):
    """(out, grad of x, grad) of one forward and backward; grad random when not given."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    grad = torch.randn_like(out) if grad is None else grad
    out.backward(grad)
    return out, x.grad, grad


def assert_same_steps(original, ours, x, steps=1):
    """`steps` training steps of both on fresh inputs like x: outputs, grads and buffers agree after each."""
    tol = TOLERANCE[x.dtype]
    for _ in range(steps):
        x = torch.randn_like(x)
        for module in (original, ours):
            module.zero_grad(set_to_none=True)
        expected, expected_gx, grad = step(original, x)
        out, gx, _ = step(ours, x, grad)
        assert out.is_contiguous(memory_format=output_memory_format(x))
        assert_close_relative(out, expected, tol, name="out")
        assert_close_relative(gx, expected_gx, tol, name="grad of x")
        grads = dict(original.named_parameters())
        largest = max(p.grad.abs().max().item() for p in grads.values() if p.grad is not None)
        for name, p in ours.named_parameters():
            q = grads[name]
            assert (p.grad is None) == (q.grad is None), name
            if q.grad is not None:
                # A 1x1 cheap weight is scale-invariant under its BN: its grad is rounding noise
                # around zero, compared against the largest grad.
                scale = largest if name == "cheap_operation.0.weight" and q.shape[-1] == 1 else None
                assert_close_relative(p.grad, q.grad, tol, scale, name=name)
        buffers = dict(original.named_buffers())
        for name, b in ours.named_buffers():
            if b.is_floating_point():
                assert_close_relative(b, buffers[name], tol, name=name)
            else:
                assert torch.equal(b, buffers[name]), name


CONFIGS = [
    dict(inp=16, oup=16),
    dict(inp=8, oup=13, ratio=3, dw_size=5, relu=False),
    dict(inp=6, oup=11, ratio=4, dw_size=7, stride=2),
    dict(inp=5, oup=9, dw_size=1),
    dict(inp=6, oup=12, kernel_size=3, stride=2),
    dict(inp=7, oup=10, kernel_size=3, relu=False),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_original(config, dtype, channels_last):
    original, ours = pair(dtype, **config)
    x = make_input(3, config["inp"], 11, 9, channels_last=channels_last, dtype=dtype)
    assert_same_steps(original, ours, x, steps=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_layout_conversions_of_a_3x3_primary(dtype, channels_last, stride):
    """A strided k x k primary of at most 16 input channels reads x channels_last; 16 channels on
    8x8 (pixels and channels multiples of the vector width) take the in-register transposes. At
    stride 1 the shifted-GEMM conv reads NCHW."""
    original, ours = pair(dtype, inp=16, oup=32, kernel_size=3, stride=stride)
    assert_same_steps(original, ours, make_input(2, 16, 8, 8, channels_last=channels_last, dtype=dtype))


@pytest.mark.parametrize("inp, oup, kernel", [(16, 16, 3), (3, 16, 3), (1, 5, 5), (9, 14, 7), (16, 40, 3)])
@pytest.mark.parametrize("height, width", [(32, 32), (1, 1), (2, 5), (7, 3), (11, 13)])
def test_shifted_primary(inp, oup, kernel, height, width):
    """The k x k stride-1 primaries of at most 16 input channels (shifted_conv.h): forward, grad_x
    and grad_W1 over planes smaller than the kernel, single rows and columns, and column tails of
    the 16- and 32-wide tiles."""
    original, ours = pair(inp=inp, oup=oup, kernel_size=kernel)
    assert_same_steps(original, ours, make_input(2, inp, height, width))


@pytest.mark.parametrize("batch, size, threads", [(1, 7, 1), (2, 1, 2), (5, 3, 3), (5, 3, 2)])
def test_small_batches(batch, size, threads):
    """Also the images and channels split over intra-op threads, evenly or not."""
    original, ours = pair(inp=6, oup=8)
    with intra_op_threads(threads):
        assert_same_steps(original, ours, make_input(batch, 6, size, size))


@pytest.mark.parametrize("bn", [
    lambda m: setattr(m, "momentum", None),  # cumulative moving average
    lambda m: setattr(m, "momentum", 0.7),
    lambda m: setattr(m, "eps", 0.25),
], ids=["momentum-none", "momentum-0.7", "eps"])
def test_batch_norm_settings(bn):
    original, ours = pair(bn=bn, inp=6, oup=12, relu=False)
    assert_same_steps(original, ours, make_input(2, 6, 8, 8), steps=3)


def test_no_running_statistics_and_no_affine():
    """track_running_stats=False: batch statistics in eval too; affine=False: no gamma/beta."""
    for config in (dict(track_running_stats=False), dict(affine=False)):
        original, ours = ReferenceGhostModule(6, 12).double(), GhostModule(6, 12).double()
        for module in (original, ours):
            module.primary_conv[1] = nn.BatchNorm2d(6, **config).double()
            module.cheap_operation[1] = nn.BatchNorm2d(6, **config).double()
        ours.load_state_dict(original.state_dict())
        assert_same_steps(original.train(), ours.train(), make_input(2, 6, 8, 8), steps=2)
        if not config.get("track_running_stats", True):
            assert_same_steps(original.eval(), ours.eval(), make_input(2, 6, 8, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_original_layers_return_the_ops_layout(channels_last):
    """Where the op does not apply (here a primary conv with a bias; also autocast, no kernel), the
    original layers run, and an out_channels that cuts the concat still returns x's layout."""
    original, ours = pair(inp=6, oup=11)
    for module in (original, ours):
        conv = module.primary_conv[0]
        module.primary_conv[0] = nn.Conv2d(6, conv.out_channels, 1, bias=True).double()
        module.primary_conv[0].weight.data.copy_(conv.weight.data)
    ours.primary_conv[0].bias.data.copy_(original.primary_conv[0].bias.data)
    x = make_input(2, 6, 5, 7, channels_last=channels_last)
    assert ours.batch_statistics_forward(x) is None
    out = ours(x)
    assert out.is_contiguous(memory_format=output_memory_format(x))
    torch.testing.assert_close(out, original(x), rtol=1e-10, atol=1e-10)


def test_eval_after_training_uses_the_updated_statistics():
    original, ours = pair(inp=8, oup=16)
    assert_same_steps(original, ours, make_input(4, 8, 10, 10), steps=3)
    original.eval(), ours.eval()
    x = make_input(2, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_updates_the_statistics_as_eager(reentrant):
    """A checkpointed Ghost module: its two BNs updated twice, as eager's."""
    original, ours = pair(inp=8, oup=16)
    assert_checkpointed_statistics_as_eager(original, ours, make_input(4, 8, 6, 6), reentrant)


# The CUDA entry (Triton: interpreted on CPU tensors without a GPU) in float64 only: on a GPU its
# float32 convolutions may run TF32.
@pytest.mark.parametrize("entry, dtype", [("op", torch.float64), ("op", torch.float32), ("fallback", torch.float64),
                                          ("fallback", torch.float32), ("cuda", torch.float64)], ids=str)
def test_op_updates_the_running_statistics_as_batch_norm(entry, dtype):
    """The running statistics given to the op (C++ kernel, composition, CUDA entry) move in place as
    F.batch_norm moves them on the same pre-BN maps, each BN's at its momentum; the outputs are
    those of a call without them."""
    device = TRITON_DEVICE if entry == "cuda" else "cpu"
    args = [a.to(device) if isinstance(a, torch.Tensor) else a
            for a in _op_arguments(dtype=dtype, requires_grad=False, stride=2)]
    running = [t.to(device) for t in _running_statistics(dtype, args[1].shape[0], args[4].shape[0])]
    expected = [t.clone() for t in running]
    kernel = {"op": torch.ops.ghostkernels.ghost_module_train, "fallback": ghost_train._fallback,
              "cuda": ghost_train._cuda}[entry]
    with torch._C._AutoDispatchBelowAutograd():  # where the dispatcher calls the entries
        outputs = kernel(*args, *running, 0.3, 0.05)
    reference = ghost_module_train_reference(*args)
    F.batch_norm(reference[1], expected[0], expected[1], training=True, momentum=0.3)
    F.batch_norm(reference[2], expected[2], expected[3], training=True, momentum=0.05)
    names = ("primary_running_mean", "primary_running_var", "cheap_running_mean", "cheap_running_var")
    for name, got, want in zip(names, running, expected):
        assert_close_relative(got, want, TOLERANCE[dtype], name=name)
    for got, want in zip(outputs, reference):
        assert_close_relative(got, want, TOLERANCE[dtype])


def test_ghost_module_v2_trains_like_the_original():
    original, ours = pair(original_class=ReferenceGhostModuleV2, ours_class=GhostModuleV2, inp=8, oup=16)
    assert_same_steps(original, ours, make_input(2, 8, 10, 10), steps=2)


def test_the_output_may_be_added_to_in_place():
    """GhostNet's bottlenecks add the shortcut into ghost2's output in place; the backward does
    not read the output."""
    original, ours = pair(inp=8, oup=8, relu=False)
    x, shortcut = make_input(2, 8, 6, 6), make_input(2, 8, 6, 6)
    results = []
    for module in (original, ours):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out += shortcut
        out.square().sum().backward()
        results.append((out, xi.grad, module.primary_conv[0].weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_batch_of_one_value_per_channel_raises_like_batch_norm():
    original, ours = pair(inp=4, oup=8)
    for module in (original, ours):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module(make_input(1, 4, 1, 1))


def test_empty_batch_runs_the_original_layers():
    original, ours = pair(inp=4, oup=8)
    x = make_input(0, 4, 5, 5)
    assert ours(x).shape == original(x).shape == (0, 8, 5, 5)


def _op_arguments(dtype=torch.float64, inp=4, oup=7, ratio=3, kernel=1, dw=3, stride=1, activation="relu",
                  channels_last=False, requires_grad=True):
    init = -(-oup // ratio)
    ghosts = init * (ratio - 1)
    tensors = [make_input(3, inp, 6, 5, channels_last=channels_last, dtype=dtype),
               torch.randn(init, inp, kernel, kernel, dtype=dtype), torch.rand(init, dtype=dtype) + 0.5,
               torch.randn(init, dtype=dtype), torch.randn(ghosts, 1, dw, dw, dtype=dtype),
               torch.rand(ghosts, dtype=dtype) + 0.5, torch.randn(ghosts, dtype=dtype)]
    return [t.requires_grad_(requires_grad) for t in tensors] + [oup, stride, activation, 1e-5, 1e-3]


def _running_statistics(dtype, init, ghosts):
    """Running statistics for the op's four slots."""
    return [torch.randn(init, dtype=dtype), torch.rand(init, dtype=dtype) + 0.5, torch.randn(ghosts, dtype=dtype),
            torch.rand(ghosts, dtype=dtype) + 0.5]


@pytest.mark.parametrize("config", [dict(), dict(activation="none", dw=5, stride=2), dict(kernel=3, ratio=2)])
def test_gradcheck(config, one_thread):
    args = _op_arguments(**config)

    def output(*tensors):
        return torch.ops.ghostkernels.ghost_module_train(*tensors, *args[7:])[0]

    assert torch.autograd.gradcheck(output, args[:7])
    assert torch.autograd.gradgradcheck(output, args[:7])


@pytest.mark.parametrize("channels_last, running", [(False, False), (True, False), (False, True)],
                         ids=["nchw", "channels_last", "running_statistics"])
def test_opcheck(channels_last, running):
    """Also with running statistics: their mutation is what the schema declares."""
    args = _op_arguments(channels_last=channels_last)
    if running:
        args += _running_statistics(torch.float64, args[1].shape[0], args[4].shape[0]) + [0.1, 0.2]
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_train.default, args)
    outputs = torch.ops.ghostkernels.ghost_module_train(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                            for a in args])
    grad = torch.randn_like(outputs[0])
    backward_args = [grad] + [a.detach() for a in args[:7]] + list(outputs[1:]) + args[7:12]
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_train_backward.default, backward_args)


def test_op_matches_its_reference():
    args = _op_arguments(requires_grad=False)
    for got, expected in zip(torch.ops.ghostkernels.ghost_module_train(*args), ghost_module_train_reference(*args)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", [dict(), dict(oup=13, ratio=3, dw=5, stride=2, channels_last=True),
                                    dict(activation="none", kernel=3, ratio=2, dw=1)], ids=str)
def test_backward_fallback_is_the_references_gradient(config):
    """The fallback backward kernel (the Triton tests' oracle) written out, against autograd through
    the reference; below autograd's dispatch key, where the dispatcher calls it (ops.py's test of
    the same name says why)."""
    args = _op_arguments(**config)
    outputs = ghost_module_train_reference(*args)
    grad = torch.randn_like(outputs[0])
    expected = torch.autograd.grad(outputs[0], args[:7], grad)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    with torch._C._AutoDispatchBelowAutograd():
        got = _backward_fallback(grad, *detached[:7], *[t.detach() for t in outputs[1:]], *detached[7:])
    assert got[0].is_contiguous(memory_format=output_memory_format(args[0]))
    for name, a, b in zip(("x", "W1", "gamma1", "beta1", "W2", "gamma2", "beta2"), got, expected):
        assert_close_relative(a, b, 1e-10, name=name)


@pytest.mark.parametrize("index, change, error, match, kernel_match", [
    (2, lambda t: t[:-1], ValueError, "primary_gamma must have shape", "primary_gamma must have shape"),
    (6, lambda t: t.float(), TypeError, "cheap_beta is torch.float32", "must match x's dtype"),
    (0, lambda t: t[0], ValueError, "4-D", "4-D"),
    (4, lambda t: t[:, :, :2, :2], ValueError, "odd d", "odd d"),
    (12, lambda t: t[:-1], ValueError, r"primary_running_mean must have shape \(3,\)",
     r"primary_running_mean must have shape \(3,\)"),
    (14, lambda t: t.float(), TypeError, "cheap_running_mean is torch.float32", "cheap_running_mean is Float"),
    (15, lambda t: None, ValueError, "cheap_running_mean and cheap_running_var must both be given or both be None",
     "cheap_running_mean and cheap_running_var must both be given or both be None"),
])
def test_bad_arguments_are_named(index, change, error, match, kernel_match):
    """The fake kernel (what torch.compile runs) and the C++ kernel (or the fallback) name the argument."""
    args = _op_arguments(requires_grad=False)
    args += _running_statistics(torch.float64, args[1].shape[0], args[4].shape[0]) + [0.1, 0.1]
    args[index] = change(args[index])
    with pytest.raises(error, match=match):
        _fake(*args)
    with pytest.raises(BAD_ARGUMENT, match=kernel_match if CPP_LIBRARY else match):
        torch.ops.ghostkernels.ghost_module_train(*args)


@pytest.mark.parametrize("index, change, error, match, kernel_match", [
    (0, lambda t: t[:, :5], ValueError, r"grad must have shape", "grad, primary_z and cheap_z do not match"),
    (10, lambda t: t[:-1], ValueError, r"primary_mean must have shape \(3,\)", r"primary_mean must have shape \(3,\)"),
    (13, lambda t: t[:-1], ValueError, r"cheap_var must have shape \(6,\)", r"cheap_var must have shape \(6,\)"),
    (8, lambda t: t.float(), TypeError, "primary_z is torch.float32", None),  # C++: data_ptr's dtype error
])
def test_backward_op_checks_direct_calls(index, change, error, match, kernel_match):
    """The backward op reads the forward's outputs where the forward's shapes say: a direct call with
    others gets an error naming the argument from every kernel (the C++ one did not check the
    statistics' lengths), not reads past their ends."""
    args = _op_arguments(requires_grad=False)
    outputs = torch.ops.ghostkernels.ghost_module_train(*args)
    backward_args = [torch.randn_like(outputs[0])] + args[:7] + list(outputs[1:]) + args[7:]
    backward_args[index] = change(backward_args[index])
    for entry in (_backward_fake, _backward_fallback, ghost_train._backward_cuda):
        with pytest.raises(error, match=match):
            entry(*backward_args)
    if kernel_match is not None or not CPP_LIBRARY:
        with pytest.raises(BAD_ARGUMENT, match=kernel_match if CPP_LIBRARY else match):
            torch.ops.ghostkernels.ghost_module_train_backward(*backward_args)


def test_compile_trains_like_eager():
    original, ours = pair(dtype=torch.float32, inp=8, oup=12)
    compiled = torch.compile(ours, backend="aot_eager")
    x = torch.randn(2, 8, 9, 9)
    expected, expected_gx, grad = step(original, x)
    out, gx, _ = step(compiled, x, grad)
    assert_close_relative(out, expected, 1e-5)
    assert_close_relative(gx, expected_gx, 1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_distributed_data_parallel(tmp_path):
    """DistributedDataParallel (gloo, 2 processes) over an accelerated training model gives the
    gradients eager PyTorch gives: the mean of each process's gradients, each process's BNs
    normalising by its own half of the batch (BatchNorm2d under DDP, not SyncBatchNorm)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "grads.pt")
    mp.spawn(distributed_training.worker, args=(2, port, path), nprocs=2)
    model, x, y = distributed_training.problem()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad / 2
    found = torch.load(path)
    # BN biases that a training-mode BN follows have zero grads in exact arithmetic: float noise
    # either way, compared against the model's largest grad.
    largest = max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        assert_close_relative(found[name], grad, 1e-10, max(grad.abs().max().item(), 1e-3 * largest), name=name)


def test_sync_batch_norm_runs_the_original_layers():
    """convert_sync_batchnorm's SyncBatchNorm is not fused: the module keeps its original layers
    (which PyTorch runs only in a process group, on GPU tensors)."""
    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(GhostModule(4, 8).double())
    assert type(module.primary_conv[1]) is torch.nn.SyncBatchNorm
    assert module.batch_statistics_forward(make_input(2, 4, 5, 5)) is None


def test_batch_norms_of_another_dtype_run_the_original_layers():
    """Mixed-precision recipes keep a float16 model's BNs in float32, which nn.BatchNorm2d takes
    and the op (one dtype; it raised a TypeError) does not."""
    module = GhostModule(4, 8).double()
    module.primary_conv[1].float()
    assert module.batch_statistics_forward(make_input(2, 4, 5, 5)) is None


# -- the Triton kernels (GPU; here in Triton's interpreter on CPU tensors) ----------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_CASES = [dict(), dict(oup=13, ratio=3, dw=5, activation="none", channels_last=True),
                dict(oup=7, ratio=4, dw=1, stride=2), dict(kernel=3, stride=2, dw=7)]
TRITON_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# float32 runs the same kernel code as float64, with float32 sums: the two cheap cases cover it
# (the interpreter takes 6 s for each of the others, and CI has minutes).
TRITON_DTYPE_CASES = [(dtype, case) for case in TRITON_CASES for dtype in (torch.float64, torch.bfloat16)] + \
    [(torch.float32, case) for case in TRITON_CASES[::2]]


@pytest.mark.parametrize("dtype, case", TRITON_DTYPE_CASES, ids=str)
def test_triton_kernels_match_the_reference(case, dtype):
    """Forward outputs and every grad of triton_ghost_train against the reference in float64."""
    from ghostkernels import triton_ghost_train

    args = [a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a
            for a in _op_arguments(requires_grad=False, **case)]
    exact = list(args)
    args[:7] = [t.to(dtype) for t in args[:7]]
    if case.get("channels_last"):
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    exact[:7] = [t.double() for t in args[:7]]  # the same rounded values in float64
    tol = TRITON_TOLERANCE[dtype]
    got = triton_ghost_train.forward(*args)
    expected = ghost_module_train_reference(*exact)
    assert got[0].is_contiguous(memory_format=output_memory_format(args[0]))
    for name, a, b in zip(("out", "z1", "z2", "mean1", "var1", "mean2", "var2"), got, expected):
        assert a.dtype == dtype
        assert_close_relative(a.double(), b, tol, name=name)
    if dtype == torch.bfloat16 and case.get("activation", "relu") == "relu":
        return  # a pre-activation within bfloat16 rounding of 0 flips its ReLU mask: the backward without ReLU
    grad = torch.randn(got[0].shape, dtype=torch.float64, device=TRITON_DEVICE).to(dtype)
    grads = triton_ghost_train.backward(grad, *args[:7], *got[1:], *args[7:])
    expected_grads = _backward_fallback(grad.double(), *exact[:7], *expected[1:], *exact[7:])
    names = ("x", "W1", "gamma1", "beta1", "W2", "gamma2", "beta2")
    for name, a, b in zip(names, grads, expected_grads):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close_relative(a.double(), b, tol, name=name)


def test_cuda_backward_under_deterministic_algorithms(monkeypatch):
    """The Triton backward adds per-program sums atomically (no fixed order): with
    torch.use_deterministic_algorithms(True) the CUDA entry runs the composition instead."""
    from ghostkernels import triton_ghost_train

    args = [a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in _op_arguments(requires_grad=False)]
    outputs = ghost_module_train_reference(*args)
    backward_args = (torch.randn_like(outputs[0]), *args[:7], *outputs[1:], *args[7:])
    monkeypatch.setattr(triton_ghost_train, "backward", lambda *a: pytest.fail("the atomic kernels ran"))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = ghost_train._backward_cuda(*backward_args)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for a, b in zip(grads, _backward_fallback(*backward_args)):
        assert torch.equal(a, b)


def test_training_steps_follow_eager(one_thread):
    """Three SGD steps with momentum of an accelerated GhostNet 0.5x (float64) leave every
    parameter and buffer where eager's steps leave them."""
    from ghostkernels import accelerate
    from ghostkernels.models import ghostnet

    torch.manual_seed(0)
    eager = ghostnet(0.5, num_classes=10, dropout=0.0, fused=False).double().train()
    fast = accelerate(eager, check=False)
    batches = [(torch.randn(4, 3, 48, 48, dtype=torch.float64), torch.randint(0, 10, (4,))) for _ in range(3)]
    for model in (eager, fast):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    expected = eager.state_dict()
    for name, value in fast.state_dict().items():
        if value.is_floating_point():
            # at least 1e-6: a BN bias that a training-mode BN follows gets zero grads in exact
            # arithmetic and float64 noise (1e-17) here, around its initial 0
            assert_close_relative(value, expected[name], 1e-9, max(expected[name].abs().max().item(), 1e-6), name=name)
        else:
            assert torch.equal(value, expected[name]), name
