"""The rest of the Ghost family: GhostNetV2, GhostNetV3, G-Ghost RegNet, Ghost-VGG/ResNet.
Keys and sizes against the public implementations' numbers, parity of the fused and
accelerated forms with the plain ones, forward and backward of every model."""

import pytest
import torch
from torch import nn

from ghostkernels import GhostModuleV2, accelerate, ghostify
from ghostkernels.models import (
    GGhostStage, g_ghost_regnetx, g_ghost_regnetx_032, ghostnetv2_100, ghostnetv2_130, ghostnetv2_160, ghostnetv3,
    ghostnetv3_050, ghostnetv3_100, resnet56_cifar, vgg16_cifar,
)
from ghostkernels.models.g_ghost_regnet import Bottleneck

from conftest import randomise_bn


def assert_close32(actual, expected):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -- GhostNetV2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("builder, params", [(ghostnetv2_100, 6_156_908), (ghostnetv2_130, 8_960_404),
                                             (ghostnetv2_160, 12_392_698)])
def test_ghostnetv2_sizes_and_keys(builder, params):
    model = builder()
    assert n_params(model) == params  # timm's and the original's counts
    keys = model.state_dict()
    assert len(keys) == 764
    assert "blocks.1.0.ghost1.short_conv.0.weight" not in keys  # blocks 0 and 1: no attention
    assert keys["blocks.3.0.ghost1.short_conv.2.weight"].shape[-2:] == (1, 5)
    assert keys["blocks.3.0.ghost1.short_conv.4.weight"].shape[-2:] == (5, 1)
    builder(fused=False).load_state_dict(keys, strict=True)


def test_ghostnetv2_fused_and_accelerated_match_the_original():
    fused = randomise_bn(ghostnetv2_100(num_classes=10), spread=0.2).eval()
    original = ghostnetv2_100(num_classes=10, fused=False).eval()
    original.load_state_dict(fused.state_dict())
    fast = accelerate(original)
    assert len(fast.acceleration_summary.fused) == 32 and not fast.acceleration_summary.skipped
    assert sum(isinstance(m, GhostModuleV2) for m in fast.modules()) == 14
    x = torch.randn(2, 3, 67, 75)  # odd sizes: pooling floors, the gate's upsampling undoes it
    with torch.no_grad():
        expected = original(x)
        assert_close32(fused(x), expected)
        assert_close32(fast(x), expected)


# -- GhostNetV3 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("builder, params, deployed", [(ghostnetv3_050, 3_395_384, 2_853_176),
                                                       (ghostnetv3_100, 8_129_028, 6_147_588)])
def test_ghostnetv3_sizes_and_keys(builder, params, deployed):
    model = builder()
    keys = model.state_dict()
    assert n_params(model) == params and len(keys) == 1956  # timm's counts
    assert "blocks.3.0.ghost1.primary_rpr_conv.2.bn1.running_var" in keys
    assert "blocks.3.0.ghost1.cheap_rpr_skip.weight" in keys and "blocks.3.0.dw_rpr_scale.conv.weight" in keys
    model.eval().reparameterize()
    deploy_keys = model.state_dict()
    assert n_params(model) == deployed and len(deploy_keys) == 492
    primary = deploy_keys["blocks.3.0.ghost1.primary_conv.0.weight"]
    assert deploy_keys["blocks.3.0.ghost1.primary_conv.0.bias"].shape == primary.shape[:1]
    assert deploy_keys["blocks.3.0.conv_dw.weight"].shape[1:] == (1, 5, 5) and "blocks.3.0.conv_dw.bias" in deploy_keys
    builder().eval().reparameterize().load_state_dict(deploy_keys, strict=True)


def test_ghostnetv3_reparameterize_and_accelerate_match():
    model = randomise_bn(ghostnetv3(0.5, num_classes=10), spread=0.2).eval()
    x = torch.randn(2, 3, 49, 53)
    with torch.no_grad():
        multi_branch = model(x)
        skipped = accelerate(model).acceleration_summary.skipped
        assert len(skipped) == 32 and all("reparameterize()" in why for _, why in skipped)  # it says what to do
        model.reparameterize()
        deployed = model(x)
        fast = accelerate(model)
        accelerated = fast(x)
    assert_close32(deployed, multi_branch)
    assert_close32(accelerated, deployed)
    summary = fast.acceleration_summary
    assert len(summary.fused) == 32 and not summary.skipped
    assert "blocks.1.0.conv_dw (direct conv kernel)" in summary.folded


def test_ghostnetv3_trains():
    model = ghostnetv3(0.5, num_classes=10).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()  # 32 would leave the DFC pool a 1x1 map
    assert model.blocks[3][0].ghost1.primary_rpr_conv[1].conv.weight.grad is not None


# -- G-Ghost RegNet -----------------------------------------------------------------------------


def test_g_ghost_regnet_sizes_and_keys():
    model = g_ghost_regnetx_032()
    keys = model.state_dict()
    assert n_params(model) == 10_511_000 and len(keys) == 518  # the original code's counts
    assert keys["layer2.merge.1.weight"].shape == (120, 480, 1, 1) and keys["layer2.cheap.0.weight"].shape == (120,) * 2 + (1, 1)
    assert keys["layer3.layers.0.conv2.weight"].shape == (216, 36, 3, 3)
    assert "layer3.layers.0.downsample.0.weight" not in keys
    with pytest.raises(ValueError, match="name must be one of"):
        g_ghost_regnetx("033")


@pytest.mark.parametrize("channels_last", [False, True])
def test_g_ghost_stage_fast_path_and_accelerate_match(channels_last):
    original = randomise_bn(g_ghost_regnetx("006", num_classes=10, fused=False), spread=0.1).eval()
    fused = g_ghost_regnetx("006", num_classes=10).eval()
    fused.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 48, 40)
    if channels_last:
        original, x = original.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = original(x)
        fast = accelerate(original)
        assert_close32(fused(x), expected)
        assert_close32(fast(x), expected)
    assert isinstance(fast.layer3, GGhostStage) and list(fast.acceleration_summary.fused) == ["layer2", "layer3", "layer4"]
    with torch.enable_grad():  # eval with autograd: the original ops
        assert_close32(fast(x), expected)


def test_g_ghost_regnet_trains_and_accelerated_gradients_match():
    """64x64 inputs: at 32x32 layer4's training-mode BNs normalise two values per channel (batch 2
    at 1x1), where any two BN implementations' rounding differs by 1e-1 in float32."""
    model = randomise_bn(g_ghost_regnetx("002", num_classes=10, fused=False), spread=0.1).double().train()
    fast = accelerate(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    fast_out = fast(x)
    torch.testing.assert_close(fast_out, out, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(fast_out.square().sum(), list(fast.parameters())),
                    torch.autograd.grad(out.square().sum(), list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * max(b.abs().max().item(), 1.0))


def test_bottleneck_names_fold_but_pre_activation_blocks_do_not():
    class PreActBottleneck(Bottleneck):
        pass

    blocks = nn.Sequential(Bottleneck(8, 8, group_width=4), PreActBottleneck(8, 8, group_width=4))
    summary = accelerate(randomise_bn(blocks, 0.2).eval()).acceleration_summary
    assert summary.folded == ["0.conv1+bn1", "0.conv2+bn2", "0.conv3+bn3"]


# -- Ghost-VGG-16, Ghost-ResNet-56, Ghost-ResNet-50 ------------------------------------------------


@pytest.mark.parametrize("builder", [resnet56_cifar, vgg16_cifar])
def test_ghost_cifar_networks_accelerate_and_train(builder):
    ghost = randomise_bn(ghostify(builder(), ratio=2), spread=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ghost(x)
        fast = accelerate(ghost)
        assert_close32(fast(x), expected)
    assert fast.acceleration_summary.fused and not fast.acceleration_summary.skipped
    ghost.train()(x).sum().backward()


def test_ghost_module_v2_compiles_and_exports():
    module = randomise_bn(GhostModuleV2(8, 12), spread=0.2).eval()
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        expected = module(x)
        assert_close32(torch.compile(module, fullgraph=True)(x), expected)
    exported = torch.export.export(module, (x,))
    assert any("ghost_module_gated" in str(node.target) for node in exported.graph.nodes)
    assert_close32(exported.module()(x), expected)


def test_accelerated_g_ghost_regnet_compiles():
    model = randomise_bn(g_ghost_regnetx("002", num_classes=10, fused=False), spread=0.1).eval()
    fast = accelerate(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # aot_eager: the fake kernels and fullgraph without inductor's C++ builds (~25 s
        # in a fresh CI cache); test_models.py compiles a whole accelerated GhostNet with inductor.
        assert_close32(torch.compile(fast, fullgraph=True, backend="aot_eager")(x), model(x))
