"""`python -m ghostkernels`: the install's report and its check of the fused op against the reference."""

import os
import subprocess
import sys

import torch
from conftest import needs_gpu

import ghostkernels.__main__ as main_module


def test_module_runs_and_agrees():
    result = subprocess.run([sys.executable, "-m", "ghostkernels"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu: " in result.stdout and "cuda: " in result.stdout and "all agree" in result.stdout


def test_report_only(capsys):
    assert main_module.main(["--no-check"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "against the reference" not in out


def test_a_wrong_kernel_fails_the_check(monkeypatch, capsys):
    fused = main_module.ghost_module
    monkeypatch.setattr(main_module, "ghost_module", lambda *args, **kwargs: fused(*args, **kwargs) * (1 + 1e-4))
    assert main_module.main([]) == 1
    out = capsys.readouterr().out
    assert "WRONG" in out and "3 disagree" in out


@needs_gpu
def test_cuda_half_precision_agrees():
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for label, error, tolerance in main_module.check("cuda", dtype, generator):
            assert error <= tolerance, label


def test_a_device_without_fused_kernels_is_named():
    """Without the C++ library the CPU's check compares the reference with itself: the output says so."""
    env = dict(os.environ, GHOSTKERNELS_DISABLE_CPP="1")
    result = subprocess.run([sys.executable, "-m", "ghostkernels"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(no fused kernel ran)" in result.stdout
    assert "cpu: no fused kernel ran, the PyTorch reference did" in result.stdout
