"""ghostkernels.precompile: the Triton kernels of a CUDA forward compiled ahead of it, on a thread
pool. Without a GPU the compile runs for real for sm_90 through bench/first_call_compile.py (the
ops' CUDA entries on CPU tensors, a stand-in for Triton's driver); with one, on the GPU."""

import os
import re
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import ghostkernels
from ghostkernels import models, triton_ghost

from conftest import needs_gpu, needs_triton_kernels, randomise_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
precompile_module = sys.modules["ghostkernels.precompile"]  # the package's `precompile` is the function


def small_ghostnet():
    return randomise_bn(models.ghostnet_050(num_classes=10), spread=0.2).eval()


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ghostkernels.precompile(lambda x: x, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="must be in eval mode"):
        ghostkernels.precompile(small_ghostnet().train(), torch.randn(1, 3, 32, 32))


def test_nothing_to_compile_on_the_cpu():
    model = small_ghostnet()
    x = torch.randn(1, 3, 32, 32)
    assert ghostkernels.precompile(model, x) == (0, 0.0)
    summary = ghostkernels.accelerate(model, example_inputs=x).acceleration_summary
    assert summary.precompiled == 0 and "Triton kernels compiled" not in str(summary)


def test_freeze_precompiles_its_graph_without_a_warning(recwarn):
    """freeze() precompiles the frozen graph (a TorchScript module, no `training` attribute)."""
    model = ghostkernels.accelerate(small_ghostnet())
    ghostkernels.freeze(model, torch.randn(1, 3, 32, 32))
    assert not [w for w in recwarn if "ahead of the first forward" in str(w.message)]


def test_compile_only_ends_with_its_block_and_stays_in_its_thread():
    """Another thread's launches run meanwhile (a server answering while a model is precompiled)."""
    seen_by_another_thread = []
    with pytest.raises(RuntimeError, match="inside"):
        with triton_ghost.compile_only():
            assert triton_ghost._compile_only.get()
            other = threading.Thread(target=lambda: seen_by_another_thread.append(triton_ghost._compile_only.get()))
            other.start()
            other.join()
            raise RuntimeError("inside")
    assert not triton_ghost._compile_only.get() and seen_by_another_thread == [False]


def test_a_failed_precompile_warns_and_accelerates(monkeypatch):
    def broken(model, example_inputs):
        raise RuntimeError("no AsyncCompileMode here")

    monkeypatch.setattr(precompile_module, "precompile", broken)
    model = small_ghostnet()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="accelerate: compiling the Triton kernels ahead.*no AsyncCompileMode"):
        fast = ghostkernels.accelerate(model, example_inputs=x)
    assert fast.acceleration_summary.precompiled == 0
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)


@needs_triton_kernels
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles for itself (the test below)")
def test_first_forward_compiled_for_sm90_without_a_gpu():
    """The compile-only forward of a small accelerated GhostNet: every launch's variant compiled
    (ptxas included) on two threads, and a second compile-only forward finds them all (what a
    real forward launches is what precompile compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/first_call_compile.py", "--model", "ghostnet_050", "--batch", "2",
                           "--size", "32", "--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"workers 2: (\d+) kernel variants, precompile [\d.]+ s, of which the compile-only forward on "
                      r"this CPU [\d.]+ s: compiling [-\d.]+ s; again: (\d+)", proc.stdout)
    assert found, proc.stdout
    assert int(found.group(1)) >= 10 and int(found.group(2)) == 0, proc.stdout


@needs_gpu
def test_precompiled_forward_compiles_nothing_and_matches():
    """accelerate(..., example_inputs=x) on a GPU compiles the forward's kernels; the forward then
    compiles none and gives what an accelerated model without precompile gives."""
    model = small_ghostnet().cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = ghostkernels.accelerate(model, example_inputs=x)
    assert not [w for w in caught if "ahead of the first forward failed" in str(w.message)], caught
    assert fast.acceleration_summary.precompiled > 0, fast.acceleration_summary

    def compiled_variants():
        kernels = precompile_module.jit_kernels()
        return sum(len(cache[0]) for kernel in kernels for cache in kernel.device_caches.values())

    before = compiled_variants()
    with torch.no_grad():
        out = fast(x)
        assert compiled_variants() == before
        expected = ghostkernels.accelerate(model)(x)
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2)

