"""ghostify and count_params_flops: shapes, what is kept dense, the paper's Ghost-VGG-16 /
Ghost-ResNet-56 / Ghost-ResNet-50 sizes, and the argument errors."""

import functools

import pytest
import torch
from torch import nn

from ghostkernels import GhostModule, count_params_flops, ghostify
from ghostkernels.ghostify import ParamsFlops
from ghostkernels.models import ghostnet_100, resnet50, resnet56_cifar, vgg16_cifar


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise: stays
        nn.Conv2d(32, 33, 1),
        nn.Conv2d(33, 33, 3, padding=2, dilation=2),  # dilated: stays
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(33, 10))


class ShortcutBlock(nn.Module):
    """A block with its projection in `shortcut`, as CIFAR ResNets and GhostNet name it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, 2, 1)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)


def conv_kinds(model):
    """{qualified name: 'Conv2d' or 'GhostModule'} of the convs ghostify considers."""
    ghosts = [f"{name}." for name, m in model.named_modules() if isinstance(m, GhostModule)]
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, GhostModule)) and not any(name.startswith(g) for g in ghosts)}


@pytest.mark.parametrize("ratio", [2, 4])
def test_ghostify_keeps_shapes_and_compresses(ratio):
    plain = small_cnn()
    ghost = ghostify(plain, ratio=ratio)
    kinds = [type(m).__name__ for m in ghost]
    assert kinds[0] == kinds[3] == kinds[7] == "GhostModule"
    assert kinds[6] == kinds[8] == "Conv2d"
    assert ghost[3].primary_conv[0].stride == (2, 2) and ghost[7].oup == 33
    x = torch.randn(2, 3, 16, 16)
    for mode in (True, False):
        plain.train(mode), ghost.train(mode)
        with torch.no_grad():
            assert ghost(x).shape == plain(x).shape == (2, 10)
    params, macs = count_params_flops(plain, (1, 3, 16, 16))
    ghost_params, ghost_macs = count_params_flops(ghost, (1, 3, 16, 16))
    assert ghost_params < params and ghost_macs < macs
    assert isinstance(plain[0], nn.Conv2d)  # inplace=False left the plain model alone


def test_count_params_flops_ghostnet():
    model = ghostnet_100()
    params, macs = count_params_flops(model, (1, 3, 224, 224))
    assert params == sum(p.numel() for p in model.parameters())
    assert 140e6 < macs < 142e6  # docs/architecture.md section 1: about 141M multiply-adds
    assert count_params_flops(ghostnet_100(fused=False), (1, 3, 224, 224))[1] == macs


def test_count_params_flops_counts_plain_layers_exactly():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    result = count_params_flops(model, [2, 3, 4, 4])
    assert isinstance(result, ParamsFlops) and result == (result.params, result.macs)
    assert result.params == 3 * 8 * 9 + 128 * 5 + 5
    assert result.macs == 2 * (8 * 16 * 27 + 5 * 128)


# -- Ghost-VGG-16, Ghost-ResNet-56, Ghost-ResNet-50 ------------------------------------------------

SIZES = {vgg16_cifar: (1, 3, 32, 32), resnet56_cifar: (1, 3, 32, 32), resnet50: (1, 3, 224, 224)}


# Built and counted once for the whole file: a ResNet-50 forward at 224x224 takes seconds on a CPU.
@functools.cache
def network(builder, ratio=None, keep=()):
    """builder()'s network, ghostified with ratio and keep unless ratio is None."""
    if ratio is None:
        return builder()
    return ghostify(network(builder), ratio=ratio, keep=keep)


@functools.cache
def counted(builder, ratio=None, keep=()):
    return count_params_flops(network(builder, ratio, keep), SIZES[builder])


@pytest.mark.parametrize("builder, params, macs", [
    (vgg16_cifar, 14.99e6, 313.5e6),      # paper: 15.0M, 313M
    (resnet56_cifar, 0.853e6, 125.5e6),   # paper: 0.85M, 125M
    (resnet50, 25.56e6, 4089e6),          # 25.6M, 4.1G
])
def test_plain_networks_and_their_ghost_versions(builder, params, macs):
    p, m = counted(builder)
    assert p == pytest.approx(params, rel=2e-3) and m == pytest.approx(macs, rel=2e-3)
    for ratio in (2, 4):
        gp, gm = counted(builder, ratio)
        # about 1/s of the weights and multiply-adds; the cheap ops, BNs and the fc are the rest
        assert gp < p * (1 / ratio + 0.1) and gm < m * (1 / ratio + 0.1)
    if builder is vgg16_cifar:
        assert counted(builder, 2).params == pytest.approx(7.66e6, rel=1e-3)  # paper: 7.7M


# Tables 3 and 4 of the paper (multiply-adds, which it calls FLOPs), d = 3. VGG-16 and ResNet-56
# have every conv replaced (ResNet-56's option-A shortcuts have none); ResNet-50 keeps its stem,
# as the authors' ghost_resnet.py does.
@pytest.mark.parametrize("builder, ratio, keep, paper_macs", [
    (vgg16_cifar, 2, (), 158e6),
    (resnet56_cifar, 2, (), 63e6),
    (resnet50, 2, "stem", 2.2e9),
    (resnet50, 4, "stem", 1.2e9),
])
def test_ghost_networks_match_the_papers_multiply_adds(builder, ratio, keep, paper_macs):
    assert counted(builder, ratio, keep).macs == pytest.approx(paper_macs, rel=0.06)


def test_ghost_resnet50_s4_matches_the_paper_only_with_the_stem_kept():
    assert counted(resnet50, 4).macs < 1.2e9 * 0.94  # 1.10G: the stem replaced too
    assert counted(resnet50, 4, ("stem", "downsample")).macs > 1.2e9 * 1.06  # 1.44G
    assert counted(resnet50, 4, "stem").macs == pytest.approx(1.2e9, rel=0.02)  # 1.18G


# -- keep ------------------------------------------------------------------------------------------


def test_keep_stem_and_downsample_on_resnet50():
    downsample = {f"layer{i}.0.downsample.0" for i in range(1, 5)}
    stem_kept = conv_kinds(network(resnet50, 2, "stem"))
    assert stem_kept.pop("conv1") == "Conv2d" and set(stem_kept.values()) == {"GhostModule"}
    downsample_kept = conv_kinds(ghostify(network(resnet50), keep=["downsample"]))
    assert {name for name, kind in downsample_kept.items() if kind == "Conv2d"} == downsample
    both_kept = conv_kinds(network(resnet50, 4, ("stem", "downsample")))
    assert {name for name, kind in both_kept.items() if kind == "Conv2d"} == downsample | {"conv1"}
    assert all(kind == "Conv2d" for kind in conv_kinds(network(resnet50)).values())  # the copies left it alone


def test_keep_none_keeps_nothing():
    assert conv_kinds(ghostify(small_cnn(), keep=None)) == conv_kinds(ghostify(small_cnn()))


def test_keep_downsample_covers_shortcut_branches_and_kept_convs_are_copies():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ShortcutBlock())
    ghost = ghostify(plain, keep=("downsample", "stem"))
    assert conv_kinds(ghost) == {"0": "Conv2d", "1.conv": "GhostModule", "1.shortcut.0": "Conv2d"}
    assert ghost[1].shortcut[0] is not plain[1].shortcut[0]
    assert torch.equal(ghost[1].shortcut[0].weight, plain[1].shortcut[0].weight)
    assert ghost(torch.randn(2, 3, 8, 8)).shape == (2, 16, 4, 4)


def test_keep_predicate_sees_each_eligible_conv_of_the_original_model():
    plain = small_cnn()
    seen = []

    def keep_pointwise(name, conv):
        seen.append((name, conv))
        return conv.kernel_size == (1, 1)

    ghost = ghostify(plain, keep=keep_pointwise)
    assert seen == [("0", plain[0]), ("3", plain[3]), ("7", plain[7])]  # not the depthwise or dilated ones
    assert conv_kinds(ghost) == {"0": "GhostModule", "3": "GhostModule", "6": "Conv2d", "7": "Conv2d", "8": "Conv2d"}
    same = ghostify(plain, inplace=True, keep=lambda name, conv: conv is plain[3])
    assert same is plain and type(plain[3]) is nn.Conv2d and type(plain[0]) is GhostModule


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep="head"), ValueError, r"keep accepts the names \('stem', 'downsample'\).*'head'"),
    (dict(keep=("stem", "fc")), ValueError, r"keep .*'fc'"),
    (dict(keep=3), TypeError, r"keep must be a callable .* or names among \('stem', 'downsample'\), got 3"),
    (dict(ratio=1), ValueError, r"ratio must be an integer >= 2, got 1"),
    (dict(ratio=2.5), TypeError, r"ratio must be an integer >= 2, got 2.5"),
    (dict(ratio="2"), TypeError, r"ratio must be an integer >= 2"),
    (dict(dw_size=4), ValueError, r"dw_size must be a positive odd integer, got 4"),
    (dict(dw_size=-1), ValueError, r"dw_size must be a positive odd integer"),
    (dict(dw_size=3.0), TypeError, r"dw_size must be a positive odd integer"),
    (dict(relu="yes"), TypeError, r"relu must be True or False, got 'yes'"),
    (dict(inplace=1), TypeError, r"inplace must be True or False"),
])
def test_ghostify_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match="ghostify: " + match):
        ghostify(small_cnn(), **kwargs)


def test_ghostify_rejects_a_model_that_is_not_a_module():
    with pytest.raises(TypeError, match="ghostify: model must be a torch.nn.Module, got str"):
        ghostify("resnet50")


@pytest.mark.parametrize("input_size, error", [
    (224, TypeError), (None, TypeError), ("1,3,16,16", TypeError), ((1, 3, 16.0, 16), TypeError),
    ((), ValueError), ((1, 3, 0, 16), ValueError), ((-1, 3, 16, 16), ValueError),
])
def test_count_params_flops_rejects_bad_input_sizes(input_size, error):
    with pytest.raises(error, match=r"count_params_flops: input_size must be a shape such as \(1, 3, 224, 224\)"):
        count_params_flops(small_cnn(), input_size)


def test_count_params_flops_rejects_models_without_parameters_or_not_modules():
    with pytest.raises(ValueError, match="count_params_flops: model has no parameters"):
        count_params_flops(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), (1, 3, 16, 16))
    with pytest.raises(TypeError, match="count_params_flops: model must be a torch.nn.Module, got function"):
        count_params_flops(small_cnn, (1, 3, 16, 16))
