"""The fused op against the reference: forward, backward, gradcheck, opcheck, errors."""

import itertools
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings

import pytest
import torch
import torch.nn.functional as F

import ghostkernels
from ghostkernels import ghost_module, ghost_module_reference
from ghostkernels.reference import ghost_module_gated_reference, ghost_module_gradients, upsample_nearest

from conftest import BAD_ARGUMENT, CPP_LIBRARY, intra_op_threads, make_input, make_weights, needs_cpp_library

# (ratio, dw, stride, activation, channels_last, primary kernel): every combination users hit.
CONFIGS = list(itertools.product([2, 3, 4], [1, 3, 5, 7], [1, 2], ["relu", "none"], [False, True], [1, 3]))


def config_id(config):
    ratio, dw, stride, act, cl, kernel = config
    return f"r{ratio}-d{dw}-s{stride}-{act}-{'cl' if cl else 'nchw'}-k{kernel}"


def run_both(config, dtype, batch, oup=None, size=(9, 11), inp=5, gate_size=None):
    """Outputs and grads of (x, W1, b1, W2, b2[, gate]) from the op and from the reference
    (float64). gate_size: also pass GhostNetV2 gate logits of that spatial size."""
    ratio, dw, stride, act, cl, kernel = config
    oup = oup or 4 * ratio - 1  # odd, and not a multiple of ratio: the slice drops channels
    x = make_input(batch, inp, *size, channels_last=cl, dtype=dtype, requires_grad=True)
    weights = make_weights(inp, oup, ratio, dw, kernel, dtype=dtype, requires_grad=True)
    leaves = [x] + weights
    if gate_size is not None:
        leaves.append(torch.randn(batch, oup, *gate_size, dtype=dtype, requires_grad=True))
    kwargs = dict(out_channels=oup, stride=stride, activation=act)

    def run(fused, tensors):
        if gate_size is None:
            return ghost_module(*tensors, **kwargs) if fused else ghost_module_reference(*tensors, **kwargs)
        if fused:
            return ghost_module(*tensors[:-1], gate=tensors[-1], **kwargs)
        return ghost_module_gated_reference(*tensors, **kwargs)

    out = run(True, leaves)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_out = run(False, ref_leaves)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.double())
    return out, grads, ref_out, ref_grads


def assert_matches(actual, expected, rtol):
    """Relative to the tensor's scale: rtol of max |expected| as the absolute floor too."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * max(scale, 1.0))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_forward_backward_float64(config):
    out, grads, ref_out, ref_grads = run_both(config, torch.float64, batch=2)
    assert_matches(out, ref_out, 1e-10)
    for g, r in zip(grads, ref_grads):
        assert_matches(g, r, 1e-10)


@pytest.mark.parametrize("config", CONFIGS[::5], ids=config_id)
def test_forward_backward_float32(config):
    out, grads, ref_out, ref_grads = run_both(config, torch.float32, batch=1)
    assert out.dtype == torch.float32
    assert_matches(out, ref_out, 1e-5)
    for g, r in zip(grads, ref_grads):
        assert_matches(g, r, 1e-5)


@pytest.mark.parametrize("width", [16, 24, 32, 64])
@pytest.mark.parametrize("dw", [3, 5, 7])
def test_float32_rows_of_whole_vectors(dw, width):
    """Planes whose rows are whole vectors (AVX2: 8 floats, AVX-512: 16), where the cheap op's taps
    skip the masks inside a row and read each row of taps from one pointer; float64 takes the
    generic taps, so float32 is what reaches that path."""
    for stride in (1, 2):
        out, grads, ref_out, ref_grads = run_both((2, dw, stride, "relu", False, 1), torch.float32, batch=1,
                                                  size=(5, width * stride))
        assert_matches(out, ref_out, 1e-5)
        for g, r in zip(grads, ref_grads):
            assert_matches(g, r, 1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_keeps_memory_format(channels_last):
    x = make_input(2, 8, 6, 6, channels_last=channels_last)
    out = ghost_module(x, *make_weights(8, 12, 2, 3), out_channels=12)
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected)


@pytest.mark.parametrize("batch", [0, 1])
def test_small_batches(batch):
    config = (3, 3, 1, "relu", False, 1)
    out, grads, ref_out, ref_grads = run_both(config, torch.float64, batch=batch)
    assert out.shape[0] == batch
    for g, r in zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads)):
        assert_matches(g, r, 1e-10)


@pytest.mark.parametrize("oup", [7, 8, 9, 16])
def test_every_slice(oup):
    """oup from init (every ghost channel dropped) to init * ratio."""
    config = (2, 3, 1, "relu", False, 1)
    out, grads, ref_out, ref_grads = run_both(config, torch.float64, batch=2, oup=oup, inp=6)
    for g, r in zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads)):
        assert_matches(g, r, 1e-10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_planes_cross_band_and_channel_tiles(threads):
    """Shapes big enough that the kernel cuts rows into bands and channels into groups, which the
    intra-op threads share (3: an uneven split)."""
    for config, inp, oup, size in [
        ((2, 3, 1, "relu", False, 1), 64, 200, (60, 50)),
        ((3, 5, 1, "relu", True, 1), 64, 201, (60, 50)),
        ((4, 7, 2, "none", False, 1), 8, 31, (70, 33)),
    ]:
        with intra_op_threads(threads):
            out, grads, ref_out, ref_grads = run_both(config, torch.float64, batch=1, oup=oup, size=size, inp=inp)
        for g, r in zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads)):
            assert_matches(g, r, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("size", [(7, 7), (5, 10), (3, 17), (4, 13), (6, 8)], ids=str)
def test_plane_widths_past_full_vectors(size, dtype):
    """gemm.h's column tails: planes of 1-4 pixels past a whole number of vectors (GhostNet's 7x7
    is 49 = 3 x 16 + 1; a tail of 1, and of 2 in float32 on AVX-512, is dot products, the others a
    tile read in place but for the last rows, copied into the panel) and one of exactly three
    vectors (48), with inp past a k block (256) and not a multiple of the vector width. The
    backward's W1 gradient adds a dot-product tail to its sums (init 17 = 16 + 1 columns)."""
    config = (2, 3, 1, "relu", False, 1)
    out, grads, ref_out, ref_grads = run_both(config, dtype, batch=1, oup=33, size=size, inp=300)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for g, r in zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads)):
        assert_matches(g, r, rtol)


def test_without_biases():
    x = make_input(2, 6, 7, 7, requires_grad=True)
    w1, _, w2, _ = make_weights(6, 10, 2, 3, requires_grad=True)
    out = ghost_module(x, w1, None, w2, None, out_channels=10)
    ref = ghost_module_reference(x, w1, None, w2, None, out_channels=10)
    assert_matches(out, ref.detach(), 1e-10)
    grads = torch.autograd.grad(out.sum(), (x, w1, w2))
    ref_grads = torch.autograd.grad(ref.sum(), (x, w1, w2))
    for g, r in zip(grads, ref_grads):
        assert_matches(g, r, 1e-10)


def with_nans(x):
    """x with NaN in one channel of one pixel and in every channel of the last pixel (last row and
    column: the depthwise taps must not carry it into the next row's first column)."""
    x = x.detach().clone()
    x[0, 1, 2, 3] = float("nan")
    x[-1, :, -1, -1] = float("nan")
    return x


def assert_same_nans(actual, expected, rtol):
    """NaN exactly where the reference has it; elsewhere as assert_matches."""
    assert actual.shape == expected.shape
    scale = expected.nan_to_num(0.0).abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * max(scale, 1.0), equal_nan=True)


NAN_CONFIGS = [c for c in CONFIGS if c[:3] == (2, 3, 1)] + [(3, 5, 2, "relu", False, 3), (3, 5, 2, "relu", True, 3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("config", NAN_CONFIGS, ids=config_id)
def test_nan_propagates_like_the_reference(config, gated, dtype):
    """torch.relu(nan) is nan: a NaN in x or in a weight reaches the output in every channel where
    the reference has it, in both layouts."""
    ratio, dw, stride, act, cl, kernel = config
    oup = 4 * ratio - 1
    x = with_nans(make_input(2, 5, 7, 9, channels_last=cl, dtype=dtype))
    weights = make_weights(5, oup, ratio, dw, kernel, dtype=dtype)
    weights[2][1, 0, dw // 2, dw // 2] = float("nan")  # the centre tap: read at every pixel
    kwargs = dict(out_channels=oup, stride=stride, activation=act)
    if gated:
        gate = torch.randn(2, oup, 3, 4, dtype=dtype)
        out = ghost_module(x, *weights, gate=gate, **kwargs)
        expected = ghost_module_gated_reference(*(t.double() for t in (x, *weights, gate)), **kwargs)
    else:
        out = ghost_module(x, *weights, **kwargs)
        expected = ghost_module_reference(*(t.double() for t in (x, *weights)), **kwargs)
    assert expected.isnan().any() and not expected.isnan().all()
    assert_same_nans(out, expected, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("config", NAN_CONFIGS, ids=config_id)
def test_nan_output_passes_the_grad_like_relu(config):
    """relu's backward (threshold_backward) masks where the output is <= 0: a NaN output passes
    the grad, so grad_x and the bias grads stay finite and match the reference. Every ghost channel
    is kept: the kernels give a dropped one's weights zero grad where the reference has 0 * NaN."""
    ratio, dw, stride, act, cl, kernel = config
    x = with_nans(make_input(2, 5, 7, 9, channels_last=cl)).requires_grad_()
    weights = make_weights(5, 4 * ratio, ratio, dw, kernel, requires_grad=True)
    kwargs = dict(out_channels=4 * ratio, stride=stride, activation=act)
    out = ghost_module(x, *weights, **kwargs)
    ref_leaves = [t.detach().requires_grad_() for t in (x, *weights)]
    expected = ghost_module_reference(*ref_leaves, **kwargs)
    grad = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (x, *weights), grad)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad)
    assert ref_grads[0].isfinite().all()
    for g, r in zip(grads, ref_grads):
        assert_same_nans(g, r, 1e-10)


@pytest.mark.parametrize(
    "config", [(2, 3, 1, "relu", False, 1), (3, 5, 2, "none", True, 1), (4, 3, 2, "relu", False, 3)], ids=config_id
)
def test_gradcheck(config):
    ratio, dw, stride, act, cl, kernel = config
    oup = 2 * ratio + 1
    x = make_input(1, 3, 6, 5, channels_last=cl, requires_grad=True)
    weights = make_weights(3, oup, ratio, dw, kernel, requires_grad=True)

    def fn(x, w1, b1, w2, b2):
        return ghost_module(x, w1, b1, w2, b2, out_channels=oup, stride=stride, activation=act)

    assert torch.autograd.gradcheck(fn, (x, *weights))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x = make_input(2, 4, 6, 5, channels_last=channels_last, requires_grad=True)
    weights = make_weights(4, 7, 3, 3, requires_grad=True)
    args = (x, *weights, 7, 1, "relu")
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module.default, args)
    out = torch.ops.ghostkernels.ghost_module(*args)
    backward_args = (torch.randn_like(out), out.detach(), x.detach(), *[w.detach() for w in weights], 7, 1, "relu")
    torch.library.opcheck(torch.ops.ghostkernels.ghost_module_backward.default, backward_args)


@pytest.mark.parametrize("inp, oup, ratio, dw, kernel, stride, activation, channels_last", [
    (4, 7, 2, 3, 1, 1, "relu", False), (5, 13, 3, 5, 1, 2, "relu", True), (3, 9, 4, 1, 3, 1, "none", False),
    (6, 8, 2, 7, 3, 2, "relu", True)])
def test_backward_fallback_is_the_references_gradient(inp, oup, ratio, dw, kernel, stride, activation, channels_last):
    """The fallback backward kernel's math (no compiled or Triton kernel), written out with aten's
    conv backward, against autograd through the reference. It runs below autograd's dispatch key, as the
    dispatcher calls it under a TorchDispatchMode, where autograd through the reference recorded
    nothing and raised (opcheck without the C++ library, FlopCounterMode)."""
    x = make_input(2, inp, 7, 6, channels_last=channels_last, requires_grad=True)
    weights = make_weights(inp, oup, ratio, dw, kernel=kernel, requires_grad=True)
    config = dict(out_channels=oup, stride=stride, activation=activation)
    out = ghost_module_reference(x, *weights, **config)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, [x, *weights], grad)
    with torch._C._AutoDispatchBelowAutograd():
        got = ghost_module_gradients(grad, out.detach(), x.detach(), weights[0].detach(), weights[2].detach(), stride,
                                     activation)
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for name, a, b in zip(("x", "W1", "b1", "W2", "b2"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_cpu_kernel_is_in_use():
    """CI builds the extension: a missing C++ kernel must fail here, not skip."""
    if os.environ.get("GHOSTKERNELS_DISABLE_CPP") == "1":
        pytest.fail("GHOSTKERNELS_DISABLE_CPP=1 is set: the suite must run with the C++ kernel")
    report = ghostkernels.backends()
    assert report["cpu"]["backend"] == "cpp", report["cpu"]["reason"]


@pytest.mark.parametrize("machine, capability, build", [
    ("x86_64", "AVX512", "_C_avx512"), ("x86_64", "AVX2", "_C_avx2"), ("x86_64", "DEFAULT", None),
    ("aarch64", "DEFAULT", "_C")])
def test_cpu_build_follows_the_instruction_set(monkeypatch, machine, capability, build):
    """x86-64 installs hold a build per instruction set (csrc/isa.h); a CPU with neither gets the
    reference and a reason that says what is missing."""
    monkeypatch.setattr(ghostkernels._backends.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    name, why_not = ghostkernels._backends._cpu_build()
    assert name == build
    assert (why_not is None) == (build is not None)
    if build is None:
        assert "AVX2 or AVX-512" in why_not and capability in why_not


def test_library_older_than_its_sources_is_not_loaded(tmp_path, monkeypatch):
    """In a source checkout, a library built from other sources than csrc/ holds now (a `git pull`
    without a rebuild) is not loaded: one whose registrations do not match the ops' schemas aborts
    the process as it loads. The reference runs and backends() says why. One built from csrc/ as
    it is, or one without a checkout around it (an installed wheel), loads."""
    from ghostkernels import _sources

    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "op.cpp").write_text("int f();\n")
    (tmp_path / "ghostkernels").mkdir()
    library = tmp_path / "ghostkernels" / "_C.so"
    library.write_bytes(b"")
    assert _sources.stale_reason(str(library)) is None  # no setup.py beside csrc/: not a checkout
    (tmp_path / "setup.py").write_text("")
    assert "predates the sources digest" in _sources.stale_reason(str(library))
    (tmp_path / "ghostkernels" / f"_C.so{_sources.DIGEST_SUFFIX}").write_text(_sources.digest(tmp_path / "csrc"))
    assert _sources.stale_reason(str(library)) is None
    (tmp_path / "csrc" / "op.cpp").write_text("int f(int);\n")
    reason = _sources.stale_reason(str(library))
    assert "csrc/ changed since it was built" in reason and "pip install --no-build-isolation -e ." in reason
    monkeypatch.setattr(ghostkernels._backends, "_cpu_status", None)
    monkeypatch.setattr(ghostkernels._backends, "cpu_library", lambda: ("_C", str(library)))
    backend, why = ghostkernels._backends.load_cpu_extension()
    assert backend == "reference" and reason in why


@pytest.mark.parametrize("compiler", ["fails to compile", "does not run"])
def test_install_without_a_working_compiler_skips_the_cpp_build(tmp_path, compiler):
    """setup.py on a machine that cannot build the kernels (a compiler without OpenMP, none that
    runs) installs the package anyway, whose ops then fall back to the reference (the loader says
    why), and removes an earlier build's library, which would load as if the build had succeeded;
    in a copy of the sources, so that the checkout's build/ is left alone."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(root, name), tmp_path)
    shutil.copytree(os.path.join(root, "csrc"), tmp_path / "csrc")
    shutil.copytree(os.path.join(root, "ghostkernels"), tmp_path / "ghostkernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    cxx = tmp_path / "cxx"
    # Answers the version queries as the real compiler does and fails every compile, or fails all.
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-c" ] && exit 1; done\nexec c++ "$@"\n'
                   if compiler == "fails to compile" else "#!/bin/sh\nexit 1\n")
    cxx.chmod(0o755)
    earlier_build, _ = ghostkernels._backends._cpu_build()  # the library this CPU would load
    if earlier_build:
        (tmp_path / "ghostkernels" / f"{earlier_build}{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"")
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                            env=dict(os.environ, CXX=str(cxx)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "failed" in result.stderr or "not built" in result.stderr, result.stderr[-2000:]
    assert not list((tmp_path / "ghostkernels").glob("*.so"))  # nor an earlier build's library


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs an AVX-512 CPU")
@needs_cpp_library
def test_avx2_build_matches_the_reference_on_an_avx512_cpu():
    """The suite runs the build of the CPU it is on; on an AVX-512 CPU this runs the AVX2 build
    (ATEN_CPU_CAPABILITY=avx2) through the C++ kernels' tests (about 75 s), so that both
    builds are checked on either kind of machine. The Triton tests in those files are left out:
    the interpreter runs them the same under either build (a quarter of this test's time)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    check = "import ghostkernels; assert 'avx2 build' in ghostkernels.backends()['cpu']['reason']"
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, f"test_{name}.py") for name in (
        "ops", "direct_conv", "squeeze_excite", "cheap_mix", "pointwise_pool", "ghost_depthwise", "batch_norm",
        "ghost_residual", "train")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
                             "-k", "not avx2_build and not triton"], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@needs_cpp_library
def test_large_outputs_reuse_freed_memory():
    """csrc/output_pool.h: a freed output's block serves the next output of its size."""
    ghostkernels.empty_cache()
    x = torch.randn(1, 8, 64, 64)
    weights = make_weights(8, 16, 2, 3, dtype=torch.float32)
    out = ghost_module(x, *weights, out_channels=16)
    address = out.data_ptr()
    del out
    assert ghostkernels.backends()["cpu"]["cached_bytes"] >= 16 * 64 * 64 * 4
    out = ghost_module(x, *weights, out_channels=16)
    assert out.data_ptr() == address
    torch.testing.assert_close(out, ghost_module_reference(x, *weights, out_channels=16), rtol=1e-5, atol=1e-5)
    out.resize_(2, 16, 64, 64).fill_(1.0)  # a pooled storage grows like any other
    assert out.sum().item() == 2 * 16 * 64 * 64
    del out
    assert ghostkernels.empty_cache() > 0 and ghostkernels.backends()["cpu"]["cached_bytes"] == 0


def test_output_cache_can_be_turned_off():
    script = ("import torch, ghostkernels\n"
              "torch.ops.ghostkernels.direct_conv2d(torch.randn(1, 64, 64, 64), torch.randn(64, 1, 3, 3), None, 1)\n"
              "assert ghostkernels.backends()['cpu']['cached_bytes'] == 0\n")
    env = dict(os.environ, GHOSTKERNELS_OUTPUT_CACHE_MB="0")
    subprocess.run([sys.executable, "-c", script], env=env, check=True)


@needs_cpp_library
@pytest.mark.parametrize("value", ["-1", "abc", "1O24", ""])
def test_bad_output_cache_size_warns_and_keeps_the_default(value):
    """A typo or a negative size must not silently turn the cache off or lift its cap."""
    script = ("import torch, ghostkernels\n"
              "out = torch.ops.ghostkernels.direct_conv2d(torch.randn(1, 64, 64, 64), torch.randn(64, 1, 3, 3), None, 1)\n"
              "del out\n"
              "assert ghostkernels.backends()['cpu']['cached_bytes'] > 0\n")
    env = dict(os.environ, GHOSTKERNELS_OUTPUT_CACHE_MB=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"GHOSTKERNELS_OUTPUT_CACHE_MB='{value}' is not a whole number" in result.stderr
    assert "using the default, 1024 MiB" in result.stderr


def test_good_output_cache_size_does_not_warn():
    env = dict(os.environ, GHOSTKERNELS_OUTPUT_CACHE_MB="2048")
    result = subprocess.run([sys.executable, "-c", "import torch, ghostkernels; ghostkernels.backends()"], env=env,
                            capture_output=True, text=True, check=True)
    assert "GHOSTKERNELS_OUTPUT_CACHE_MB" not in result.stderr


def test_half_precision_on_cpu_runs_the_reference():
    x = make_input(1, 4, 5, 5, dtype=torch.bfloat16)
    weights = make_weights(4, 8, 2, 3, dtype=torch.bfloat16)
    out = ghost_module(x, *weights, out_channels=8)
    ref = ghost_module_reference(x, *weights, out_channels=8)
    torch.testing.assert_close(out, ref)


# -- bad input ---------------------------------------------------------------------------


def good_args():
    return [make_input(1, 4, 6, 6), *make_weights(4, 8, 2, 3)], dict(out_channels=8)


def with_change(index, value):
    args, kwargs = good_args()
    args[index] = value
    return args, kwargs


@pytest.mark.parametrize(
    "case, error, match",
    [
        (lambda: with_change(0, torch.randn(4, 6, 6, dtype=torch.float64)), ValueError, "x must be a 4-D"),
        (lambda: with_change(0, torch.randn(1, 5, 6, 6, dtype=torch.float64)), ValueError, "x has 5 channels"),
        (lambda: with_change(1, torch.randn(4, 4, 2, 2, dtype=torch.float64)), ValueError, "primary_weight .* odd k"),
        (lambda: with_change(3, torch.randn(4, 1, 4, 4, dtype=torch.float64)), ValueError, "cheap_weight .* odd d"),
        (lambda: with_change(3, torch.randn(6, 1, 3, 3, dtype=torch.float64)), ValueError, "multiple of init=4"),
        (lambda: with_change(1, torch.randn(4, 4, 1, 1)), TypeError, "primary_weight is torch.float32"),
        (lambda: with_change(2, torch.randn(4, dtype=torch.float64, device="meta")), TypeError, "primary_bias .* meta"),
        (lambda: with_change(4, torch.randn(3, dtype=torch.float64)), ValueError, r"cheap_bias must have shape \(4,\)"),
    ],
)
def test_bad_input(case, error, match):
    args, kwargs = case()
    with pytest.raises(error, match=match):
        ghost_module(*args, **kwargs)
    # The CUDA kernel's entry (here with CPU tensors) checks direct op calls before it launches
    # anything: Triton reads where the arguments say, so a short bias was read past its end.
    for cuda_entry, extra in ((ghostkernels.ops._ghost_module_cuda, ()),
                              (ghostkernels.ops._ghost_module_gated_cuda, (torch.randn(1, 8, 3, 3, dtype=F64),))):
        with pytest.raises(error, match=match):
            cuda_entry(*args, *extra, kwargs["out_channels"], 1, "relu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(out_channels=9), r"out_channels must be in \[4, 8\]"),
        (dict(out_channels=3), r"out_channels must be in \[4, 8\]"),
        (dict(out_channels=8, activation="gelu"), "activation must be 'relu' or 'none'"),
        (dict(out_channels=8, activation=["relu"]), "activation must be 'relu' or 'none'"),
        (dict(out_channels=8, stride=0), "stride must be >= 1"),
    ],
)
def test_bad_options(kwargs, match):
    args, _ = good_args()
    with pytest.raises(ValueError, match=match):
        ghost_module(*args, **kwargs)


def test_cpu_kernel_checks_direct_op_calls():
    """Calls that bypass the Python checks still get a clear error from the C++ kernel."""
    args, _ = good_args()
    args[0] = torch.randn(1, 5, 6, 6, dtype=torch.float64)
    with pytest.raises(BAD_ARGUMENT, match="x has 5"):
        torch.ops.ghostkernels.ghost_module(*args, 8, 1, "relu")


F64 = torch.float64


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(grad=a["grad"][:, :7]), ValueError, "grad and out must have shape"),
    (lambda a: a.update(out=a["out"][:, :, :5]), ValueError, "grad and out must have shape"),
    (lambda a: a.update(grad=a["grad"].float()), TypeError, "grad is torch.float32"),
])
def test_backward_op_checks_direct_calls(change, error, match):
    """The backward op's kernels read grad and out where the forward's shape says: a direct call
    with others gets the C++ kernel's error (or the fallback's, the fake kernel's, the CUDA
    entry's) instead of reads past their ends."""
    args, kwargs = good_args()
    out = ghost_module(*args, **kwargs)
    named = dict(grad=torch.randn_like(out), out=out)
    change(named)
    backward_args = (named["grad"], named["out"], *args, 8, 1, "relu")
    if not (CPP_LIBRARY and named["grad"].dtype != F64):  # C++ says "expected scalar type Double"
        with pytest.raises(BAD_ARGUMENT, match=match):
            torch.ops.ghostkernels.ghost_module_backward(*backward_args)
    for entry in (ghostkernels.ops._ghost_module_backward_fake, ghostkernels.ops._ghost_module_backward_cuda):
        with pytest.raises(error, match=match):
            entry(*backward_args)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("x_shape, w1_shape, stride, match", [
    # no input channels: at::conv2d (k > 1) returns no channels; a GEMM over K = 0 (k = 1) writes nothing
    pytest.param((1, 0, 6, 6), (4, 0, 1, 1), 1, "primary_weight must have at least one input channel", id="inp0-k1"),
    pytest.param((1, 0, 6, 6), (4, 0, 3, 3), 1, "primary_weight must have at least one input channel", id="inp0-k3"),
    # an empty plane at stride 2: floor((0 - 1) / 2) + 1 = 0 rows, not the 1 of C++'s truncation
    pytest.param((1, 4, 0, 6), (4, 4, 1, 1), 2, "too small", id="h0-s2"),
    pytest.param((1, 4, 6, 0), (4, 4, 1, 1), 2, "too small", id="w0-s2"),
    pytest.param((1, 4, 0, 6), (4, 4, 3, 3), 1, "too small", id="h0-k3"),
])
def test_cpu_kernel_rejects_empty_inputs(x_shape, w1_shape, stride, match, gated):
    """Direct op calls (no Python checks) with nothing to convolve get a clear error, not a crash."""
    args = [torch.randn(x_shape, dtype=F64), torch.randn(w1_shape, dtype=F64), torch.randn(4, dtype=F64),
            torch.randn(4, 1, 3, 3, dtype=F64), None]
    if gated:
        args.append(torch.randn(1, 8, 1, 1, dtype=F64))
    op = torch.ops.ghostkernels.ghost_module_gated if gated else torch.ops.ghostkernels.ghost_module
    with pytest.raises(BAD_ARGUMENT, match=match):
        op(*args, 8, stride, "relu")


# -- the GhostNetV2 gate fused into the writes -----------------------------------------------

# Gate sizes against the 9x11 (stride 1) or 5x6 (stride 2) output: pooled-and-floored
# (odd sizes: 9 -> 4 -> 9), equal to the output, and a single pixel.
GATE_SIZES = [(4, 5), (2, 3), (1, 1)]


@pytest.mark.parametrize("gate_size", GATE_SIZES, ids=str)
@pytest.mark.parametrize("config", CONFIGS[::7], ids=config_id)
def test_gated_forward_backward_float64(config, gate_size):
    out, grads, ref_out, ref_grads = run_both(config, torch.float64, batch=2, gate_size=gate_size)
    assert_matches(out, ref_out, 1e-10)
    for g, r in zip(grads, ref_grads):
        assert_matches(g, r, 1e-10)


@pytest.mark.parametrize("config", CONFIGS[3::17], ids=config_id)
def test_gated_forward_backward_float32(config):
    out, grads, ref_out, ref_grads = run_both(config, torch.float32, batch=1, size=(7, 7), gate_size=(3, 3))
    assert_matches(out, ref_out, 1e-5)
    for g, r in zip(grads, ref_grads):
        assert_matches(g, r, 1e-5)


@pytest.mark.parametrize("size, gate_size", [((8, 14), (4, 7)), ((5, 40), (3, 20)), ((9, 11), (9, 11))], ids=str)
@pytest.mark.parametrize("config", CONFIGS[1::19], ids=config_id)
def test_gated_float32_logits_of_any_size(config, size, gate_size):
    """float32 gates (the CPU kernel's own vector sigmoid) from logits over [-100, 100] and NaN,
    on outputs twice the gate's width (GhostNetV2's 2x2-pooled gates; at stride 2 these are
    upsampled otherwise), narrow and wide rows, and equal to the output."""
    ratio, dw, stride, act, channels_last, kernel = config
    oup = 4 * ratio - 1
    x = make_input(2, 5, *size, channels_last=channels_last, dtype=torch.float32)
    weights = make_weights(5, oup, ratio, dw, kernel, dtype=torch.float32)
    gate = torch.empty(2, oup, *gate_size).uniform_(-100, 100)
    gate[0, 0, 0, 0] = float("nan")
    kwargs = dict(out_channels=oup, stride=stride, activation=act)
    out = ghost_module(x, *weights, gate=gate, **kwargs)
    expected = ghost_module_gated_reference(x.double(), *[w.double() for w in weights], gate.double(), **kwargs)
    assert torch.equal(out.isnan(), expected.isnan())
    assert_matches(out.nan_to_num(), expected.nan_to_num(), 1e-5)


def test_nearest_sources_are_f_interpolates_float32_rule():
    """upsample_nearest (the fused op's gate upsampling) against F.interpolate wherever PyTorch's
    CPU kernels use the float32 rule: float32 tensors, and float64 outputs of at most 128 rows plus
    columns; (4 -> 82) is where a float64 product would round up to the next source."""
    for source, size in [(4, 82), (3, 7), (5, 40), (50, 90), (7, 7), (4, 8), (1, 9)]:
        t = torch.randn(1, 2, source, source)
        assert torch.equal(upsample_nearest(t, (size, size)), F.interpolate(t, size=(size, size), mode="nearest"))
        t = torch.randn(1, 2, 2, source, dtype=torch.float64)
        assert torch.equal(upsample_nearest(t, (2, size)), F.interpolate(t, size=(2, size), mode="nearest"))


def test_gated_where_f_interpolates_float64_rule_differs():
    """A float64 NCHW gate of 50 x 4 onto a 90 x 82 output: F.interpolate takes column 2 for output
    column 41 (41 * 4 / 82, a float64 product rounded to float32: 2.0), the op and its reference
    column 1 (float32 throughout), in the forward and in the backward alike (the backward had taken
    F.interpolate's, so the weights' gradients were not the forward's)."""
    x = make_input(1, 3, 90, 82, requires_grad=True)
    weights = make_weights(3, 6, 2, 3, requires_grad=True)
    gate = torch.randn(1, 6, 50, 4, dtype=torch.float64, requires_grad=True)
    out = ghost_module(x, *weights, out_channels=6, gate=gate)
    expected = ghost_module_gated_reference(x, *weights, gate, out_channels=6)
    assert_matches(out, expected, 1e-12)
    grad = torch.randn_like(out)
    for found, want in zip(torch.autograd.grad(out, (x, *weights, gate), grad),
                           torch.autograd.grad(expected, (x, *weights, gate), grad)):
        assert_matches(found, want, 1e-10)


@pytest.mark.parametrize("batch", [0, 1])
def test_gated_small_batches(batch):
    out, grads, ref_out, ref_grads = run_both((2, 3, 1, "relu", True, 1), torch.float64, batch, gate_size=(4, 5))
    assert_matches(out, ref_out, 1e-10)


def test_gated_gradcheck_and_opcheck():
    x = make_input(1, 3, 7, 5, requires_grad=True)
    weights = make_weights(3, 7, 2, 3, requires_grad=True)
    gate = torch.randn(1, 7, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, w1, b1, w2, b2, gate):
        return ghost_module(x, w1, b1, w2, b2, out_channels=7, gate=gate)

    assert torch.autograd.gradcheck(fn, (x, *weights, gate))
    for cl in (False, True):
        xi = make_input(2, 4, 6, 5, channels_last=cl, requires_grad=True)
        args = (xi, *make_weights(4, 7, 3, 3, requires_grad=True), torch.randn(2, 7, 3, 2, dtype=torch.float64),
                7, 1, "relu")
        torch.library.opcheck(torch.ops.ghostkernels.ghost_module_gated.default, args)


@pytest.mark.parametrize(
    "gate, error, match",
    [
        (torch.randn(8, 3, 3, dtype=torch.float64), ValueError, "gate must be a 4-D"),
        (torch.randn(1, 7, 3, 3, dtype=torch.float64), ValueError, r"gate must be \(1, 8, h, w\)"),
        (torch.randn(1, 8, 0, 3, dtype=torch.float64), ValueError, r"h, w >= 1"),
        (torch.randn(1, 8, 3, 3), TypeError, "gate is torch.float32"),
    ],
)
def test_bad_gate(gate, error, match):
    args, kwargs = good_args()
    with pytest.raises(error, match=match):
        ghost_module(*args, gate=gate, **kwargs)
    if error is ValueError and gate.dim() == 4:  # the C++ kernel says the same to direct op calls
        with pytest.raises(BAD_ARGUMENT, match="gate must be"):
            torch.ops.ghostkernels.ghost_module_gated(*args, gate, 8, 1, "relu")


def test_a_triton_older_than_3_6_is_not_used(monkeypatch):
    """torch 2.6 to 2.9 pin Triton 3.2 to 3.5 (on Triton 3.2 the interpreter failed 156 of the suite's
    Triton tests, which skip there now): the CUDA ops then run the reference, and backends() says
    why, before and after a first call."""
    import triton
    from ghostkernels import _backends, ops, triton_ghost
    monkeypatch.setattr(_backends, "_installed_triton_version", lambda: "3.2.0")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setattr(_backends, "_triton", None)
    for first_call_made in (False, True):
        if first_call_made:
            assert _backends.triton_kernels() is None and _backends.triton_kernels("triton_cheap_mix") is None
        status = ghostkernels.backends()["cuda"]
        assert status["backend"] == "reference", status
        assert status["reason"].startswith("Triton 3.2.0 is older than 3.6, which the kernels need; "
                                           "install triton>=3.6"), status
    x = make_input(2, 6, 5, 5, dtype=torch.float64)
    weights = make_weights(6, 10, 2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's one warning (keyed by x's device: cpu here)
        out = ops._ghost_module_cuda(x, *weights, 10, 1, "relu")  # the op's CUDA kernel
    torch.testing.assert_close(out, ghost_module_reference(x, *weights, out_channels=10), rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(triton, "__version__", "3.10.0")
    monkeypatch.setattr(_backends, "_triton", None)
    assert _backends.triton_kernels() is triton_ghost
