"""ghostkernels.capture(): a CUDA graph of an accelerated model. Its refusals are checked
everywhere; the capture and replay need a GPU (bench/gpu_report.py runs this file there)."""

import copy

import pytest
import torch

import ghostkernels
from ghostkernels import models


@pytest.fixture(scope="module")
def accelerated():
    return ghostkernels.accelerate(models.ghostnet(0.5, fused=False).eval())


@pytest.mark.parametrize("call, error, message", [
    (lambda m: ghostkernels.capture(m, torch.randn(1, 3, 32, 32)), ValueError, "one CUDA device"),
    (lambda m: ghostkernels.capture(m.train(), torch.randn(1, 3, 32, 32)), ValueError, "training mode"),
    (lambda m: ghostkernels.capture(m, [torch.randn(1, 3, 32, 32)]), TypeError, "example_inputs must be"),
    (lambda m: ghostkernels.capture("model", torch.randn(1, 3, 32, 32)), TypeError, "torch.nn.Module"),
])
def test_refusals(call, error, message, accelerated):
    with pytest.raises(error, match=message):
        call(copy.deepcopy(accelerated))


def test_hooks_are_said_to_run_while_recording_only(accelerated):
    """As freeze(): a replay never calls the model's hooks (checked on the CPU: the warning comes
    before the device check)."""
    model = copy.deepcopy(accelerated)
    model.blocks[3][0].se.register_forward_hook(lambda module, args, out: None)
    with pytest.warns(UserWarning, match=r"capture: hooks on 1 module\(s\) \(blocks.3.0.se\) run while it records"):
        with pytest.raises(ValueError, match="one CUDA device"):
            ghostkernels.capture(model, torch.randn(1, 3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_replay_matches_the_model_and_refuses_other_shapes(dtype):
    model = models.ghostnet(0.5, fused=False).eval().cuda().to(dtype)
    accelerated = ghostkernels.accelerate(model)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    captured = ghostkernels.capture(accelerated, x)
    with torch.no_grad():
        for _ in range(2):  # fresh inputs each call, and the first output is not overwritten by the second
            fresh = torch.randn_like(x)
            first = captured(fresh)
            captured(torch.randn_like(x))
            tol = 1e-2 if dtype == torch.float16 else 1e-3
            torch.testing.assert_close(first, accelerated(fresh), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"captured for \(2, 3, 64, 64\)"):
        captured(torch.randn(1, 3, 64, 64, device="cuda", dtype=dtype))
    with pytest.raises(ValueError, match="captured for"):
        captured(x.float() if dtype != torch.float32 else x.half())
