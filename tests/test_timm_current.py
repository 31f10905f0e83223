"""accelerate() on full-size GhostNets written the way current timm and Huawei's original code write them
(test-local copies: tests/timm_ghostnet.py, tests/huawei_ghostnet.py). timm's blocks.9.0 is a ConvBnAct
whose bn1 is a BatchNormAct2d (BatchNorm2d subclass applying drop + ReLU in its forward)."""

import copy

import pytest
import torch
from torch import nn

import ghostkernels

from conftest import assert_training_like_eager, module_output_shapes, randomise_bn, training_results
from huawei_ghostnet import huawei_ghostnet
from timm_ghostnet import BatchNormAct2d, timm_ghostnet

BUILDERS = {"timm": timm_ghostnet, "huawei": huawei_ghostnet}
MODELS = [(source, version) for source in BUILDERS for version in ("v1", "v2", "v3")]
IDS = [f"{source}-{version}" for source, version in MODELS]


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (float32)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def accelerate(model, check=False):
    """ghostkernels.accelerate(model) as the bug report calls it (check=True), or without its
    self-check (check=False): the self-check undoes a change that alters the output, so only the
    unchecked call shows whether the folds themselves are right."""
    return ghostkernels.accelerate(model, check=check)


def build(source, version):
    return randomise_bn(BUILDERS[source](version, width=1.0), spread=0.2)


@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "default"])
@pytest.mark.parametrize("source, version", MODELS, ids=IDS)
def test_accelerate_eval_logits(source, version, check):
    model = build(source, version).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        fast = accelerate(model, check)
        out = fast(x)
    assert out.shape == expected.shape == (2, 1000)
    err = rel_err(out, expected)
    summary = fast.acceleration_summary
    assert err <= 1e-5, f"{source} {version}: relative error {err:.3g}\n{summary}"
    assert len(summary.fused) == 32, str(summary)
    # timm's forward_intermediates returns conv_stem's output before bn1: the stem's BN stays
    stem = ["conv_stem+bn1"] if source == "timm" else []
    if check:  # every bottleneck's residual add in its ghost2 op
        assert len(summary.residual) == 16 and [name for name, _ in summary.skipped] == stem, str(summary)
    else:  # left: only the self-check sees a block's forward
        assert not summary.residual and [name for name, _ in summary.skipped] == stem + ["16 GhostNet bottlenecks"]


@pytest.mark.parametrize("source, version", [("timm", "v3"), ("huawei", "v1")], ids=["timm-v3", "huawei-v1"])
def test_hooks_on_every_module_fire_where_the_original_calls(source, version):
    """A tool that hooks every module (a summary, a tracer) sees the modules the original calls:
    timm's V3 keeps Identity conv_dw and bn_dw at stride 1 and never calls them, which the fused
    bottleneck did; the merged modules and their placeholders call their own layers while hooked."""
    model = build(source, version).eval()
    fast = accelerate(copy.deepcopy(model), check=True)
    common = {name for name, _ in fast.named_modules()} & {name for name, _ in model.named_modules()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (expected, original_shapes), (out, shapes) = module_output_shapes(model, x), module_output_shapes(fast, x)
    calls, original_calls = shapes.keys() & common, original_shapes.keys() & common
    assert calls == original_calls, sorted(calls ^ original_calls)[:8]
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "default"])
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_forward_intermediates_unchanged(version, check):
    """timm's feature API (forward_intermediates, which its getter feature wrapper calls) returns
    conv_stem's output before bn1 as its first map. accelerate() folded bn1 into conv_stem, which
    left forward's logits right and that map normalised (0.87-1.0 off). The self-check now runs
    forward_intermediates too, and without the check a module that has it keeps its BNs."""
    model = randomise_bn(timm_ghostnet(version, width=0.5), spread=0.2).eval()
    fast = accelerate(model, check)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for kwargs in ({}, {"indices": 2}, {"indices": [0, -1], "stop_early": True}):
            (final, maps), (fast_final, fast_maps) = model.forward_intermediates(x, **kwargs), \
                fast.forward_intermediates(x, **kwargs)
            assert rel_err(fast_final, final) <= 1e-5 and len(fast_maps) == len(maps)
            assert all(rel_err(a, e) <= 1e-5 for a, e in zip(fast_maps, maps)), kwargs
    assert "forward_intermediates()" in dict(fast.acceleration_summary.skipped)["conv_stem+bn1"]


@pytest.mark.parametrize("source, version", MODELS, ids=IDS)
def test_accelerate_train_outputs_and_gradients(source, version):
    """Training mode (the Ghost modules run ghost_module_train, batch-statistics BN fused):
    assert_training_like_eager (float32 outputs, gradients in float64)."""
    model = build(source, version).train()
    model.requires_grad_(True)  # V3 deploy forms come with detached (requires_grad=False) parameters
    # training_results draws the same dropout masks in all four runs (timm and Huawei V1/V2 use
    # p=0.2 in the head)
    results, fast_exact = training_results(model, torch.randn(2, 3, 64, 64), check=False)
    assert len(fast_exact.acceleration_summary.fused) == 32, str(fast_exact.acceleration_summary)
    assert_training_like_eager(results)


@pytest.mark.filterwarnings("ignore:ghostkernels.accelerate. the model is in training mode")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_gradient_checkpointing_trains_as_eager(version):
    """timm's set_grad_checkpointing (each bottleneck under non-reentrant checkpointing): the
    recomputation updates the BNs' running statistics a second time, ours as eager's; a bottleneck
    with an identity shortcut ends in its ghost2 op. float64: outputs, grads, every buffer."""
    model = randomise_bn(timm_ghostnet(version, width=0.5), spread=0.2).double().train()
    model.set_grad_checkpointing()
    fast = ghostkernels.accelerate(copy.deepcopy(model), check=False)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results = []
    for m in (model, fast):
        torch.manual_seed(1)  # the head's dropout
        out = m(x)
        out.square().sum().backward()
        results.append((out, m.state_dict(), {name: p.grad for name, p in m.named_parameters()}))
    (expected, expected_state, expected_grads), (out, state, grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-10, atol=1e-10, msg=name)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)


def test_timm_v1_structure_keys():
    model = timm_ghostnet("v1", width=1.0)
    sd = model.state_dict()
    keys = list(sd)
    assert keys[:3] == ["conv_stem.weight", "bn1.weight", "bn1.bias"]
    for key in ["blocks.0.0.ghost1.primary_conv.0.weight", "blocks.0.0.ghost1.primary_conv.1.running_mean",
                "blocks.0.0.ghost1.cheap_operation.0.weight", "blocks.0.0.ghost2.cheap_operation.1.weight",
                "blocks.1.0.conv_dw.weight", "blocks.1.0.bn_dw.running_var", "blocks.1.0.shortcut.3.running_mean",
                "blocks.3.0.se.conv_reduce.weight", "blocks.3.0.se.conv_expand.bias",
                "blocks.9.0.conv.weight", "blocks.9.0.bn1.weight", "blocks.9.0.bn1.running_mean",
                "blocks.9.0.bn1.num_batches_tracked"]:
        assert key in keys, key
    assert keys[-4:] == ["conv_head.weight", "conv_head.bias", "classifier.weight", "classifier.bias"]
    assert sd["blocks.9.0.conv.weight"].shape == (960, 160, 1, 1)
    assert sd["blocks.3.0.se.conv_reduce.weight"].shape == (20, 72, 1, 1)  # make_divisible(72 * .25, 4)
    assert not any("blocks.9.0.bn1.act" in k or ".aa." in k for k in keys)
    assert [len(stage) for stage in model.blocks] == [1, 1, 1, 1, 1, 1, 5, 1, 4, 1]
    bn1 = model.blocks[9][0].bn1
    assert type(bn1) is BatchNormAct2d and isinstance(bn1, nn.BatchNorm2d)
    assert isinstance(bn1.act, nn.ReLU) and isinstance(bn1.drop, nn.Identity)
    assert type(model.blocks[3][0].se.gate) is nn.Hardsigmoid
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 5.18  # timm's ghostnet_100: 5.18M
    v2 = timm_ghostnet("v2", width=1.0)
    assert "blocks.2.0.ghost1.short_conv.4.weight" in v2.state_dict()
    assert "blocks.1.0.ghost1.short_conv.0.weight" not in v2.state_dict()
    assert round(sum(p.numel() for p in v2.parameters()) / 1e6, 2) == 6.16  # timm's ghostnetv2_100: 6.16M
    # the Huawei V1 model has the same keys (its ConvBnAct's bn1 is a plain BatchNorm2d + act1)
    assert list(huawei_ghostnet("v1").state_dict()) == keys


@pytest.mark.parametrize("source, version", MODELS, ids=IDS)
def test_accelerated_in_training_then_validated(source, version):
    """accelerate() a training model, validate, train a step (BN statistics move), validate again:
    the fused eval path must fold the new statistics, as the original model uses them."""
    model = build(source, version).train()
    fast = accelerate(model, check=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for m in (model, fast):
            m.eval()(x)  # a validation pass fills the fold caches
            torch.manual_seed(1)
            m.train()(x * 2 + 0.5)  # moves every BN's running statistics
            m.eval()
        err = rel_err(fast(x), model(x))
    assert err <= 1e-5, f"{source} {version}: eval after a training step, relative error {err:.3g}"


@pytest.mark.parametrize("source, version", MODELS, ids=IDS)
def test_accelerated_eval_under_autocast(source, version):
    """timm's validate() runs the model under autocast (--amp), which does not cast a custom op's
    arguments: the activations arrive in bfloat16, the folded weights in float32. The accelerated
    model runs there, in autocast's dtype, about as close to float32 as the original model under
    autocast (observed 0.9-1.4x its error)."""
    model = build(source, version).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exact = model(x)
        fast = accelerate(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, out = model(x), fast(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert rel_err(out.float(), exact) <= 2 * rel_err(expected.float(), exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast: needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_accelerated_eval_under_cuda_autocast(dtype):
    """On CUDA the fused ops run in autocast's dtype (ops._autocast_call casts their tensors)."""
    model = build("timm", "v1").eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = model(x)
        fast = accelerate(model)
        with torch.autocast("cuda", dtype=dtype):
            expected, out = model(x), fast(x)
    assert out.dtype == expected.dtype == dtype
    assert rel_err(out.float(), exact) <= 2 * rel_err(expected.float(), exact)
