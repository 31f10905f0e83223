"""GhostModule against a module built the original way (Huawei GhostNet code structure)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from ghostkernels import GhostModule, GhostModuleV2
from ghostkernels.reference import ReferenceGhostModule, ReferenceGhostModuleV2  # the original code's structure, keys

from conftest import make_input, randomise_bn


def pair(dtype=torch.float64, v2=False, **config):
    original = (ReferenceGhostModuleV2 if v2 else ReferenceGhostModule)(**config).to(dtype)
    randomise_bn(original)
    ours = (GhostModuleV2 if v2 else GhostModule)(**config).to(dtype)
    ours.load_state_dict(original.state_dict(), strict=True)
    return original, ours


CONFIGS = [
    dict(inp=16, oup=16),
    dict(inp=8, oup=13, ratio=3, dw_size=5, relu=False),
    dict(inp=6, oup=10, ratio=4, dw_size=7, stride=2),
    dict(inp=6, oup=12, kernel_size=3, stride=2),
]


def test_state_dict_keys_match_the_original():
    original, ours = pair(inp=8, oup=16)
    assert list(ours.state_dict()) == list(original.state_dict())
    original.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_matches_original(config, channels_last):
    original, ours = pair(**config)
    original.eval(), ours.eval()
    x = make_input(2, config["inp"], 12, 10, channels_last=channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS)
def test_train_matches_original(config):
    """Same outputs, gradients and running-stat updates in training mode."""
    original, ours = pair(**config)
    original.train(), ours.train()
    x = make_input(4, config["inp"], 9, 9)
    grad = None
    results = []
    for module in (original, ours):
        xi = x.clone().requires_grad_()
        out = module(xi)
        grad = torch.randn_like(out) if grad is None else grad
        out.backward(grad)
        results.append((out, xi.grad, [p.grad for p in module.parameters()], list(module.buffers())))
    (o1, gx1, gp1, b1), (o2, gx2, gp2, b2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(gx2, gx1)
    for a, b in zip(gp2 + b2, gp1 + b1):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_eval_gradients_flow_through_the_cached_fold(monkeypatch, v2):
    """Eval mode outside no_grad (frozen-BN fine-tuning, saliency, or a forward simply run with
    grad enabled) takes the cached fold, not a fold per call; the gradients of x, the convs and the
    BN affine parameters (GhostModuleV2's DFC gate's too) stay the original's over SGD steps, each
    of which refolds once."""
    original, ours = pair(inp=8, oup=13, ratio=3, dw_size=5, v2=v2)
    original.eval(), ours.eval()
    folds = []
    fold = GhostModule._fold
    monkeypatch.setattr(GhostModule, "_fold", lambda self: folds.append(1) or fold(self))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (original, ours)]
    for step in range(3):
        x = make_input(2, 8, 9, 7, requires_grad=True)
        grads = []
        for module, optimizer in zip((original, ours), optimizers):
            for _ in range(2):  # the second call of a step hits the cache
                out = module(x)
            optimizer.zero_grad()
            grads.append(torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))
            for p, g in zip(module.parameters(), grads[-1][1:]):
                p.grad = g
            optimizer.step()
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a)
        assert len(folds) == step + 1  # one fold a step: the update changed the parameters' versions


def test_eval_gradients_through_the_cached_fold_differentiate_again():
    """create_graph=True through the cached fold: second derivatives in the BN parameters as the original's."""
    original, ours = pair(inp=6, oup=12)
    original.eval(), ours.eval()
    x = make_input(2, 6, 7, 7)
    results = []
    for module in (original, ours):
        module(x)  # folded and cached
        out = module(x)
        conv, bn = module.primary_conv[0], module.cheap_operation[1]
        (g,) = torch.autograd.grad(out.square().sum(), conv.weight, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), [bn.weight, conv.weight]))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("vectorize", [False, True])
def test_input_jacobian_through_torch_autograd(vectorize):
    """The README's statement: torch.autograd.functional.jacobian (vmap over the backward with
    vectorize=True) works, where torch.func's transforms raise PyTorch's setup_context error."""
    original, ours = pair(inp=6, oup=11, ratio=3)
    original.eval(), ours.eval()
    x = make_input(1, 6, 5, 5)
    jacobians = [torch.autograd.functional.jacobian(module, x, vectorize=vectorize) for module in (original, ours)]
    torch.testing.assert_close(jacobians[1], jacobians[0])
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.jacrev(ours)(x)


def test_eval_parameter_updated_before_the_backward_raises_as_the_original():
    """A parameter changed in place between the forward and its backward: autograd's error, as the
    original raises. The cached fold saves its sources: a backward folding again from the changed
    values would give wrong gradients silently."""
    for module in pair(inp=6, oup=12):
        module.eval()
        out = module(make_input(2, 6, 7, 7))
        with torch.no_grad():
            module.primary_conv[1].weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_fold_cache_refreshes_when_weights_change():
    original, ours = pair(inp=8, oup=16)
    original.eval(), ours.eval()
    x = make_input(1, 8, 7, 7)
    with torch.no_grad():
        ours(x)
        for module in (original, ours):
            module.primary_conv[1].running_mean.add_(0.5)
            module.cheap_operation[0].weight.mul_(2)
        torch.testing.assert_close(ours(x), original(x))
        ours.load_state_dict(ReferenceGhostModule(8, 16).double().state_dict())
        assert not torch.allclose(ours(x), original(x))


def test_float32_module():
    original, ours = pair(dtype=torch.float32, inp=24, oup=72)
    original.eval(), ours.eval()
    x = torch.randn(2, 24, 28, 28)
    with torch.no_grad():
        expected = original.double()(x.double())
        torch.testing.assert_close(ours(x).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_compile_fullgraph_eval(monkeypatch):
    # inductor's fallback kernels are stricter where CI is set (GitHub Actions sets it): see test_onnx
    monkeypatch.setenv("CI", "true")
    _, ours = pair(dtype=torch.float32, inp=8, oup=12)
    ours.eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        expected = ours(x)
        compiled = torch.compile(ours, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_export_sees_the_op():
    _, ours = pair(dtype=torch.float32, inp=8, oup=12)
    ours.eval()
    x = torch.randn(1, 8, 10, 10)
    exported = torch.export.export(ours, (x,))
    assert "ghostkernels.ghost_module" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), ours(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inp=4, oup=8, ratio=1), "ratio must be an integer >= 2"),
        (dict(inp=4, oup=8, dw_size=4), "dw_size must be a positive odd integer"),
        (dict(inp=4, oup=8, kernel_size=2), "kernel_size must be a positive odd integer"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GhostModule(**kwargs)


def test_eval_rejects_3d_input():
    module = GhostModule(4, 8).eval()
    with pytest.raises(ValueError, match="4-D"):
        module(torch.randn(4, 6, 6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_dtype_without_cpu_kernels_warns_once(monkeypatch, dtype):
    """A .bfloat16() model on the CPU runs the PyTorch compositions: right, without the kernels'
    speed; one warning says so and names the bfloat16 mode instead."""
    from ghostkernels import accelerate, ops
    from ghostkernels.models import ghostnet_050

    monkeypatch.setattr(ops, "_warned", set())
    original = ghostnet_050(num_classes=10, fused=False).eval()
    fast, x = accelerate(original).to(dtype), torch.randn(1, 3, 32, 32, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, again = fast(x), fast(x)
    messages = [str(c.message) for c in caught if "ghostkernels" in str(c.message)]
    assert len(messages) == 1 and str(dtype) in messages[0] and "'medium'" in messages[0], messages
    torch.testing.assert_close(again, out)
    with torch.no_grad():
        expected = original.to(dtype)(x)
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 1e-2}[dtype]  # both in that dtype's rounding
    assert (out - expected).abs().max() <= tolerance * expected.abs().max()


def test_fallback_without_the_extension():
    """With the C++ kernel disabled: the reference runs, one warning, backends() says why."""
    script = """
import warnings, torch, ghostkernels
from ghostkernels import ghost_module, ghost_module_reference
report = ghostkernels.backends()
assert report["cpu"]["backend"] == "reference", report
assert "GHOSTKERNELS_DISABLE_CPP" in report["cpu"]["reason"], report
x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
w = [torch.randn(4, 4, 1, 1, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
     torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = ghost_module(x, *w, out_channels=7)
    out2 = ghost_module(x, *w, out_channels=7)
    out.sum().backward()
messages = [str(c.message) for c in caught if "ghostkernels" in str(c.message)]
assert len(messages) == 1 and "reference" in messages[0], messages
torch.testing.assert_close(out, ghost_module_reference(x, *w, out_channels=7))
print("fallback ok")
"""
    env = dict(os.environ, GHOSTKERNELS_DISABLE_CPP="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
