"""ghostkernels::cheap_mix (G-GhostNet's cheap part) against its reference: C++ on the CPU, the
Triton kernel on a GPU or in the interpreter; into channel slices; gradients; errors."""

import importlib

import pytest
import torch

from ghostkernels import triton_cheap_mix
from ghostkernels.cheap_mix import cheap_mix, cheap_mix_reference

from conftest import BAD_ARGUMENT, intra_op_threads, needs_triton_kernels

# the module (ghostkernels.cheap_mix is the function of the same name)
cheap_mix_module = importlib.import_module("ghostkernels.cheap_mix")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_args(batch, channels, cin, cout, size, dtype=torch.float64, channels_last=False, bias=True):
    x = torch.randn(batch, channels, *size, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 1, 1, dtype=dtype) / cin ** 0.5
    return x, weight, torch.randn(cout, dtype=dtype) if bias else None, torch.randn(batch, cout, dtype=dtype)


def buffer_slice(batch, channels, offset, cout, size, dtype, channels_last):
    """A channel slice [offset, offset + cout) of a larger concatenation buffer."""
    buffer = torch.full((batch, channels, *size), float("nan"), dtype=dtype)
    if channels_last:
        buffer = buffer.to(memory_format=torch.channels_last)
    return buffer, buffer[:, offset:offset + cout]


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
# threads: the images and pixel chunks split over intra-op threads, evenly or not; 45 outputs at
# batch 1: one pixel chunk, the output channels in blocks (23 + 22) for the threads
@pytest.mark.parametrize("batch, offset, bias, threads, cout", [(2, 7, True, 1, 11), (1, 0, False, 1, 11),
                                                                (0, 3, True, 1, 11), (3, 7, True, 2, 11),
                                                                (3, 7, True, 3, 11), (1, 7, True, 3, 45)])
def test_cpu_matches_reference_and_writes_only_its_slice(dtype, channels_last, batch, offset, bias, threads, cout):
    x, weight, b, mix = make_args(batch, 20, 13, cout, (9, 7), dtype, channels_last, bias)
    expected = cheap_mix_reference(x, weight, b, mix, offset)
    tol = TOLERANCE[dtype]
    buffer, target = buffer_slice(batch, 19 + cout + 3, 19, cout, (9, 7), dtype, channels_last)
    with intra_op_threads(threads):
        torch.testing.assert_close(cheap_mix(x, weight, b, mix, channel_offset=offset), expected, rtol=tol, atol=tol)
        cheap_mix(x, weight, b, mix, channel_offset=offset, out=target)
    torch.testing.assert_close(target, expected, rtol=tol, atol=tol)
    assert buffer[:, :19].isnan().all() and buffer[:, 19 + cout:].isnan().all()


def test_cpu_gradcheck_and_opcheck():
    x, weight, b, mix = (t.requires_grad_() for t in make_args(2, 9, 5, 6, (4, 3)))

    def fn(x, weight, b, mix):
        return cheap_mix(x, weight, b, mix, channel_offset=3)

    assert torch.autograd.gradcheck(fn, (x, weight, b, mix))
    torch.library.opcheck(torch.ops.ghostkernels.cheap_mix.default, (x, weight, b, mix, 3))
    out = torch.empty(2, 6, 4, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ghostkernels.cheap_mix_into.default,
                          (x.detach(), weight.detach(), b.detach(), mix.detach(), 3, out))


@needs_triton_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16]
                         if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_triton_kernel_into_a_slice(dtype, channels_last):
    """The Triton kernel (interpreter on the CPU) against the float64 reference."""
    x, weight, b, mix = (t.to(DEVICE, dtype) for t in make_args(2, 40, 33, 70, (5, 13), channels_last=channels_last))
    buffer = buffer_slice(2, 90, 20, 70, (5, 13), dtype, channels_last)[0].to(DEVICE)
    target = buffer[:, 20:90]
    triton_cheap_mix.cheap_mix_into(x, weight, b, mix, 7, target)
    expected = cheap_mix_reference(*(t.double() for t in (x, weight, b, mix)), 7)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5 if DEVICE == "cpu" else 1e-2}.get(dtype, 2e-2)
    torch.testing.assert_close(target.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert buffer[:, :20].isnan().all()


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(x=a["x"][0]), ValueError, "x must be a 4-D"),
    (lambda a: a.update(weight=torch.randn(6, 5, 3, 3, dtype=torch.float64)), ValueError, r"weight must be \(cout, cin, 1, 1\)"),
    (lambda a: a.update(channel_offset=5), ValueError, "channel_offset 5 \\+ cin 5 exceeds x's 9 channels"),
    (lambda a: a.update(mix=torch.randn(2, 5, dtype=torch.float64)), ValueError, r"mix must be \(2, 6\)"),
    (lambda a: a.update(bias=torch.randn(5, dtype=torch.float64)), ValueError, r"bias must have shape \(6,\)"),
    (lambda a: a.update(mix=torch.randn(2, 6)), TypeError, "mix is torch.float32"),
    (lambda a: a.update(out=torch.empty(2, 6, 4, 4, dtype=torch.float64)), ValueError, "out must have shape"),
])
def test_bad_input(change, error, match):
    x, weight, b, mix = make_args(2, 9, 5, 6, (4, 3))
    args = dict(x=x, weight=weight, bias=b, mix=mix, channel_offset=0)
    change(args)
    tensors = [args.pop(name) for name in ("x", "weight", "bias", "mix")]
    with pytest.raises(error, match=match):
        cheap_mix(*tensors, **args)
    # The CUDA kernels' entries (here with CPU tensors) check direct op calls before they launch:
    # Triton reads and writes where the arguments say.
    out = args.pop("out", None)
    with pytest.raises(error, match=match):
        if out is None:
            cheap_mix_module._cuda(*tensors, args["channel_offset"])
        else:
            cheap_mix_module._cuda_into(*tensors, args["channel_offset"], out)


def test_no_input_channels_is_an_error():
    """A GEMM over cin = 0 wrote nothing (the output was garbage); F.conv2d returns no channels there."""
    x, _, b, mix = make_args(2, 9, 5, 6, (4, 3))
    weight = torch.randn(6, 0, 1, 1, dtype=torch.float64)
    with pytest.raises(BAD_ARGUMENT, match=r"cheap_mix: weight must have at least one input channel"):
        torch.ops.ghostkernels.cheap_mix(x, weight, b, mix, 0)
    with pytest.raises(BAD_ARGUMENT, match=r"cheap_mix: weight must have at least one input channel"):
        torch.ops.ghostkernels.cheap_mix_into(x, weight, b, mix, 0, torch.empty(2, 6, 4, 3, dtype=torch.float64))


def with_nans(x, weight, mix):
    """NaN in one channel of one pixel of x's slice, in every channel of the last pixel, in a weight
    and in one mix entry: relu(nan) is nan, as in the reference."""
    x, weight, mix = x.clone(), weight.clone(), mix.clone()
    x[0, 8, 2, 1] = float("nan")
    x[-1, :, -1, -1] = float("nan")
    weight[2, 4, 0, 0] = float("nan")
    mix[0, 5] = float("nan")
    return x, weight, mix


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_cpu_nan_stays_where_the_reference_puts_it(dtype, channels_last):
    x, weight, b, mix = make_args(2, 20, 13, 11, (9, 7), dtype, channels_last)
    x, weight, mix = with_nans(x, weight, mix)
    expected = cheap_mix_reference(x, weight, b, mix, 7)
    assert expected.isnan().any() and not expected.isnan().all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(cheap_mix(x, weight, b, mix, channel_offset=7), expected, rtol=tol, atol=tol,
                               equal_nan=True)


@needs_triton_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_triton_nan_stays_where_the_reference_puts_it(channels_last):
    """tl.maximum's default (maxnum) returns 0 for NaN; the kernel asks for NaN propagation."""
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    x, weight, b, mix = make_args(2, 20, 13, 11, (5, 7), torch.float64, channels_last)
    x, weight, mix = (t.to(DEVICE, dtype) for t in with_nans(x, weight, mix))
    b = b.to(DEVICE, dtype)
    out = torch.empty(2, 11, 5, 7, dtype=dtype, device=DEVICE)
    triton_cheap_mix.cheap_mix_into(x, weight, b, mix, 7, out)
    expected = cheap_mix_reference(*(t.double() for t in (x, weight, b, mix)), 7)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.nan_to_num(0).abs().max().item(),
                               equal_nan=True)
