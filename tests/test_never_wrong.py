"""Nothing ghostkernels does may change a model's answer silently: the fold cache after
training, parametrised and edited weights, inference mode, hooks and tied modules under
accelerate(), clear errors, and the self-check that undoes a change it cannot verify."""

import contextlib
import copy
import functools
import sys
import warnings
import zlib

import pytest
import torch
from conftest import module_output_shapes, needs_gpu, perturbed, randomise_bn
from huawei_ghostnet import huawei_ghostnet
from timm_ghostnet import timm_ghostnet
from torch import nn
from torch.nn.utils import prune

from ghostkernels import GhostModule, accelerate, acceleration, count_params_flops, freeze, models, modules
from ghostkernels.models import ghostnet_050


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rtol * max(scale, 1e-30)


def unfused(module, x):
    """The Ghost module's math op by op, with whatever its BNs hold now."""
    x1 = module.primary_conv(x)
    return torch.cat([x1, module.cheap_operation(x1)], dim=1)[:, : module.oup]


def ghost(**kwargs):
    config = dict(inp=6, oup=10, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True) | kwargs
    return randomise_bn(GhostModule(**config).double(), spread=0.5)


# -- the fold cache ------------------------------------------------------------------------------


def test_fold_follows_a_train_step():
    """BN running statistics change in training without a version bump."""
    m, x = ghost().eval(), torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():  # the cache serves calls that need no gradients
        m(x)
        m.train()
        m(x * 3 + 1)  # moves the running statistics
        m.eval()
        assert_close(m(x), unfused(m, x))


def test_zoo_ghostnet_after_bn_recalibration():
    fused = randomise_bn(ghostnet_050(num_classes=10), spread=0.2).eval()
    original = ghostnet_050(num_classes=10, fused=False).eval()
    original.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused(x)
        for model in (fused, original):
            model.train()
            model(x * 2)
            model.eval()
        assert_close(fused(x), original(x))


def test_eval_acceleration_refuses_training_mode():
    """An eval-mode acceleration folds the BNs outside the Ghost modules into their convs; in
    training mode the original normalises with batch statistics, which those convs cannot (the
    model ran on, its logits 0.8 relative off the original's)."""
    original = randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.2).eval()
    fast, x = accelerate(original), torch.randn(2, 3, 64, 64)
    fast.train()
    with pytest.raises(RuntimeError, match="folded the BatchNorm after conv_stem into it"):
        fast(x)
    fast.eval()
    with torch.no_grad():
        assert_close(fast(x), original(x))


def test_training_mode_warning_names_a_wrapper_around_an_eval_mode_model():
    """nn.Sequential(normalise, model.eval()) starts in training mode, and accelerate() takes the
    root's mode: only the Ghost modules are swapped. The warning says so, and why when every BN and
    Dropout inside is in eval mode (the outputs are the original's either way)."""
    model = randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.2)
    for wrap, hint in ((lambda: nn.Sequential(nn.Identity(), model.eval()), True), (model.train, False)):
        with pytest.warns(UserWarning, match="the model is in training mode") as caught:
            accelerate(wrap())
        assert any("a wrapper such as this Sequential" in str(w.message) for w in caught) == hint


def test_fx_traced_model_says_why_its_ghost_modules_stay():
    """torch.fx.symbolic_trace inlines the Ghost modules' forwards into its graph and keeps copies
    of them without `oup`: accelerate() leaves them, says why, and the outputs stay the original's."""
    model = randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.2).eval()
    fast, x = accelerate(torch.fx.symbolic_trace(model)), torch.randn(2, 3, 64, 64)
    reasons = dict(fast.acceleration_summary.skipped)
    assert not fast.acceleration_summary.fused and "accelerate before tracing" in reasons["blocks.0.0.ghost1"]
    with torch.no_grad():
        assert_close(fast(x), model(x))


# The original code bases' models (small widths), as accelerate() takes them.
FAMILIES = {"zoo v1": lambda: ghostnet_050(num_classes=10, fused=False),
            "timm v1": lambda: timm_ghostnet("v1", 0.5), "timm v2": lambda: timm_ghostnet("v2", 0.5),
            "timm v3": lambda: timm_ghostnet("v3", 0.5), "huawei v1": lambda: huawei_ghostnet("v1", 0.5),
            "g-ghost": lambda: models.g_ghost_regnetx("002", num_classes=10, fused=False)}


def skipped_besides_timms_stem(summary):
    """summary.skipped but timm's stem fold, which its forward_intermediates() rules out."""
    return [(name, why) for name, why in summary.skipped
            if not (name == "conv_stem+bn1" and "forward_intermediates()" in why)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_acceleration_takes_the_originals_checkpoint(family):
    """Its folded BNs have no keys and its merged modules' keys moved: the original's state dict
    is folded and renamed as it loads (strict=True), and its own state dict still loads."""
    accelerated_from, loaded = (randomise_bn(FAMILIES[family](), spread=0.3).eval() for _ in range(2))
    fast, x = accelerate(accelerated_from), torch.randn(2, 3, 64, 64)
    assert fast.acceleration_summary.folded and not skipped_besides_timms_stem(fast.acceleration_summary)
    fast.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        assert_close(fast(x), loaded(x))
        fast.load_state_dict(fast.state_dict())
        assert_close(fast(x), loaded(x))


def test_checkpoint_loaded_after_a_dtype_conversion_folds_in_the_new_dtype():
    """A float32 acceleration converted to float64 keeps float32's rounding of its folds (~1e-7
    off the float64 original); the original's float32 checkpoint loaded again refolds them in
    float64 (it was folded in float64, then rounded to the checkpoint's float32). With
    assign=True the checkpoint's tensors, so its dtype, are kept."""
    original = randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.3).eval()
    fast, x = accelerate(original).double(), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    fast.load_state_dict(original.state_dict())
    with torch.no_grad():
        assert_close(fast(x), copy.deepcopy(original).double()(x), rtol=1e-12)
    assigned = accelerate(original)
    assigned.load_state_dict(copy.deepcopy(original).double().state_dict(), assign=True)
    assert assigned.conv_stem.weight.dtype == assigned.conv_stem.bias.dtype == torch.float64


def test_eval_acceleration_refuses_bn_values_it_cannot_fold():
    """A state dict with a folded BN's values but not its conv's weight: load_state_dict(strict=False)
    would drop them and keep the folded ones."""
    original = randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.2).eval()
    fast = accelerate(original)
    bn_only = {key: value for key, value in original.state_dict().items() if key.startswith("bn1.")}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"bn1\.\*: .* folded it into conv_stem"):
            fast.load_state_dict(bn_only, strict=strict)


@pytest.mark.parametrize("edit", ["data", "eps"])
def test_fold_follows_edits_outside_the_version_counter(edit):
    m, x = ghost().eval(), torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        bn = m.cheap_operation[1]
        if edit == "data":
            bn.running_mean.data.add_(1.0)  # .data bypasses the version counter: eval() refolds
            m.eval()
        else:
            bn.eps = 0.5
        assert_close(m(x), unfused(m, x))


def test_parametrised_conv_is_folded_every_call():
    m, x = ghost().eval(), torch.randn(2, 6, 7, 7, dtype=torch.float64)
    torch.nn.utils.parametrizations.weight_norm(m.primary_conv[0])
    with torch.no_grad():
        assert_close(m(x), unfused(m, x))
        m.primary_conv[0].parametrizations.weight.original0.mul_(0.5)  # the magnitude g
        assert_close(m(x), unfused(m, x))


def test_inference_mode_then_autograd():
    m = ghost().eval().requires_grad_(False)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.inference_mode():
        m(x)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(m(x).square().sum(), x)
    (expected,) = torch.autograd.grad(unfused(m, x).square().sum(), x)
    assert_close(grad, expected)


def test_module_created_under_inference_mode():
    """Inference tensors have no version counter: the fold is redone every call, with a warning,
    and follows an in-place update made under inference_mode."""
    with torch.inference_mode():
        m, x = ghost().eval(), torch.randn(2, 6, 7, 7, dtype=torch.float64)
        with pytest.warns(UserWarning, match="created under torch.inference_mode"):
            assert_close(m(x), unfused(m, x))
        m.cheap_operation[1].running_mean.add_(1.0)
        with pytest.warns(UserWarning, match="created under torch.inference_mode"):
            assert_close(m(x), unfused(m, x))


@pytest.mark.parametrize("built_under_inference_mode", [False, True])
def test_accelerate_and_freeze_under_inference_mode(built_under_inference_mode):
    """accelerate() and freeze() called inside inference_mode give models that run inside and
    outside it, autograd included, with the original outputs."""
    torch.manual_seed(0)
    with torch.inference_mode(built_under_inference_mode):
        model = randomise_bn(ghostnet_050(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        fast = accelerate(model)
        frozen = freeze(fast, x)
        assert_close(fast(x), expected)
        assert_close(frozen(x), expected)
    assert_close(fast(x), expected)
    assert_close(frozen(x), expected)
    x.requires_grad_()
    fast(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# -- BatchNorms in training mode inside an eval-mode model ------------------------------------------
# Test-time adaptation (TENT and the like) puts a model in eval mode and its BatchNorms back in
# training mode: they normalise by the batch's statistics, which no fold of the running ones gives.


def _batch_norms_to_training(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()
    return model


@pytest.mark.parametrize("branches", [("primary_conv", "cheap_operation"), ("primary_conv",), ("cheap_operation",)],
                         ids=["both", "primary", "cheap"])
def test_ghost_module_with_batch_norms_in_training_mode(branches):
    """The fold cached in eval mode is not used: outputs and running statistics as the layers'."""
    m, x = ghost().eval(), torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        reference = copy.deepcopy(m)
        for module in (m, reference):
            for branch in branches:
                getattr(module, branch)[1].train()
        assert_close(m(x), unfused(reference, x))
    for name, buffer in m.named_buffers():
        assert_close(buffer.double(), reference.get_buffer(name).double()), name


def test_fold_follows_a_batch_norm_run_in_training_mode_on_its_own():
    """Its running statistics move without a version bump; num_batches_tracked's is in the key."""
    m, x = ghost().eval(), torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        bn = m.cheap_operation[1].train()
        bn(torch.randn(2, 5, 7, 7, dtype=torch.float64) * 3 + 1)
        bn.eval()
        assert_close(m(x), unfused(m, x))


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_accelerate_a_model_whose_batch_norms_are_in_training_mode(family, inplace):
    """accelerate() keeps each module's own mode (adopting a Ghost module set its BNs to eval, the
    self-check then undid the swap and left them so: logits 100% off) and folds no such BN. In
    float64: batch statistics of G-GhostNet's 2x2 planes amplify float32's rounding to 1e-3."""
    model = _batch_norms_to_training(randomise_bn(FAMILIES[family](), spread=0.3).eval().double())
    reference, x = copy.deepcopy(model), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    fast = accelerate(model, inplace=inplace)
    assert all(bn.training for bn in fast.modules() if isinstance(bn, nn.BatchNorm2d))
    with torch.no_grad():
        assert_close(fast(x), reference(x))


@pytest.mark.parametrize("build", [models.ghostnet_050, models.ghostnetv2_100,
                                   lambda **kwargs: models.g_ghost_regnetx("002", **kwargs)],
                         ids=["ghostnet", "ghostnetv2", "g-ghost"])
def test_zoo_models_with_batch_norms_in_training_mode(build):
    fused = randomise_bn(build(num_classes=10), spread=0.2).eval().double()
    original = build(num_classes=10, fused=False).eval().double()
    original.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        fused(x)
        for model in (fused, original):
            _batch_norms_to_training(model)
        assert_close(fused(x), original(x))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_norms_put_in_training_mode_after_accelerate(family):
    """The BNs an eval-mode accelerate() folded into their convs are still found as nn.BatchNorm2d
    (they were a module of another type, which adaptation code looking for the model's BNs passed
    over: they kept normalising by running statistics while the original's used the batch's,
    silently); put in training mode, they raise."""
    fast = accelerate(randomise_bn(FAMILIES[family](), spread=0.3).eval())
    folded = [bn for bn in fast.modules() if type(bn) is acceleration.FoldedBatchNorm]
    assert folded and all(isinstance(bn, nn.BatchNorm2d) for bn in folded)
    _batch_norms_to_training(fast)
    with pytest.raises(RuntimeError, match="folded the BatchNorm after .* test-time adaptation"):
        fast(torch.randn(2, 3, 64, 64))


def test_g_ghost_stage_with_its_folded_cheap_batch_norm_in_training_mode():
    """The stage's fast path takes the folded BN's place as well: it must not skip it."""
    fast = accelerate(models.g_ghost_regnetx("002", num_classes=10, fused=False).eval())
    fast.layer3.cheap[1].train()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"folded the BatchNorm after layer3\.cheap\.0"):
        fast(torch.randn(2, 3, 64, 64))


def test_sync_batch_norm_conversion_after_accelerate_raises():
    """convert_sync_batchnorm would replace each folded BN by a SyncBatchNorm without running
    statistics, which normalises by the batch's (the logits 0.18 off the original's in eval mode)."""
    fast = accelerate(randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.3).eval())
    with pytest.raises(TypeError, match="StatisticsFoldedIntoConv"):
        nn.SyncBatchNorm.convert_sync_batchnorm(fast)


def test_freeze_refuses_batch_norms_in_training_mode():
    model = ghostnet_050(num_classes=10, fused=False).eval()
    model.blocks[3][0].ghost1.primary_conv[1].train()
    with pytest.raises(ValueError, match=r"BatchNorm blocks\.3\.0\.ghost1\.ghost\.primary_conv\.1 \(1 in all\) is in "
                                         "training mode"):
        freeze(accelerate(model), torch.randn(1, 3, 64, 64))


def test_counting_keeps_each_modules_mode():
    model = _batch_norms_to_training(ghostnet_050(num_classes=10).eval())
    count_params_flops(model, (1, 3, 64, 64))
    assert not model.training and all(bn.training for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))


# -- 16-bit models with float32 BatchNorms (mixed-precision recipes keep them so) ---------------------


def _with_float32_batch_norms(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.float()
    return model


def test_ghost_module_with_float32_batch_norms():
    """The folded weights took the BNs' float32 (the module raised a TypeError on its own input)."""
    m = _with_float32_batch_norms(randomise_bn(GhostModule(8, 16), spread=0.3).eval().bfloat16())
    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = unfused(copy.deepcopy(m).double(), x.double())
        out = m(x)
    assert out.dtype == torch.bfloat16
    assert_close(out.double(), expected, rtol=1e-2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_accelerate_a_16_bit_model_with_float32_batch_norms(family):
    """Folds gave the folded convs a float32 bias beside bfloat16 weights (accelerate() crashed in
    its self-check); the fold is now computed in float32 and rounded once to the conv's dtype.
    Against the float64 model, within 3x the eager bfloat16 model's own error: each folded weight
    is rounded to bfloat16 once more than the conv's (1.2-2.3x over 12 seeds, norm-wise)."""
    model = _with_float32_batch_norms(randomise_bn(FAMILIES[family](), spread=0.3).eval().bfloat16())
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    fast = accelerate(model)
    assert fast.acceleration_summary.folded and not skipped_besides_timms_stem(fast.acceleration_summary)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        out, eager = fast(x), model(x)

    def error(found):
        return ((found.double() - expected).norm() / expected.norm()).item()

    assert out.dtype == torch.bfloat16 and error(out) <= 3 * error(eager), (error(out), error(eager))


# -- layers the fused ops do not compute ------------------------------------------------------------


def _sync_batch_norm(module):
    return nn.SyncBatchNorm.convert_sync_batchnorm(module).eval()


# Edits of a GhostModule's branches after its BNs were folded once: convert_sync_batchnorm (DDP
# training), another activation, a GroupNorm for a BN, a layer added after the activation.
def _leaky_relu(module):
    module.cheap_operation[2] = nn.LeakyReLU(0.2)
    return module


def _group_norm(module):
    module.primary_conv[1] = nn.GroupNorm(2, 6).double()
    return module


def _added_layer(module):
    module.primary_conv.append(nn.Hardtanh(-0.2, 0.2))
    return module


# Convs the fused op does not compute: it took each branch's conv for a 'same' square one of the
# module's stride (the cheap one depthwise), whatever it had become.
def _conv_replaced(branch, index, make_conv):
    def edit(module):
        getattr(module, branch)[index] = make_conv().double()
        return module

    return edit


def _reflect_padding(module):
    module.cheap_operation[0].padding_mode = "reflect"
    return module


_BRANCH_EDITS = {"SyncBatchNorm": _sync_batch_norm, "LeakyReLU": _leaky_relu, "GroupNorm": _group_norm,
                 "added layer": _added_layer,
                 "dilated cheap conv": _conv_replaced("cheap_operation", 0, lambda: nn.Conv2d(
                     6, 6, 3, padding=2, dilation=2, groups=6, bias=False)),
                 "reflect padding": _reflect_padding,
                 "stride-2 primary conv": _conv_replaced("primary_conv", 0, lambda: nn.Conv2d(6, 6, 1, stride=2, bias=False)),
                 "dense cheap conv": _conv_replaced("cheap_operation", 0, lambda: nn.Conv2d(6, 6, 3, padding=1, bias=False))}


@pytest.mark.parametrize("edit", list(_BRANCH_EDITS))
def test_ghost_module_branches_the_fused_op_does_not_compute(edit):
    """The eval forward folded whatever sat after each conv as a BatchNorm2d if it was one and
    ignored it otherwise, and applied the module's activation whatever the branch held: a
    GhostModule converted to SyncBatchNorm (as for DDP) returned its output without the BNs (off by
    ~0.6 on unit inputs). Branches that are not conv, BatchNorm2d, the activation now run as they are."""
    module = ghost(inp=6, oup=12).eval()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        module(x)  # folded and cached before the edit
        module = _BRANCH_EDITS[edit](module)
        assert_close(module(x), unfused(module, x))


@pytest.mark.parametrize("build", [models.ghostnet_050, models.ghostnetv2_100, lambda: models.g_ghost_regnetx("002")],
                         ids=["GhostNet 0.5x", "GhostNetV2 1.0x", "G-GhostNet RegNetX-002"])
def test_zoo_models_converted_to_sync_batch_norm(build):
    """The zoo's fused models (GhostModule, GhostModuleV2, GGhostStage's fast path) converted with
    convert_sync_batchnorm for DDP training, then evaluated: the outputs of the original layers."""
    torch.manual_seed(0)
    model = randomise_bn(build(), spread=0.3).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert_close(_sync_batch_norm(copy.deepcopy(model))(x), expected)


def _silu_act1(se):
    se.act1 = nn.SiLU()


def _sigmoid_gate(se):
    se.gate_fn = torch.sigmoid


def _new_conv_reduce(se):
    torch.manual_seed(1)  # the same weights in both models
    se.conv_reduce = nn.Conv2d(se.conv_reduce.in_channels, se.conv_reduce.out_channels, 1).double()


@pytest.mark.parametrize("edit", [_silu_act1, _sigmoid_gate, _new_conv_reduce], ids=["SiLU act1", "sigmoid gate",
                                                                                     "new conv_reduce"])
def test_squeeze_excite_edited_after_accelerate(edit):
    """SqueezeExciteGhost decided once, when accelerate() made it, that its SE's act1 is a ReLU
    and its gate a hard sigmoid: an act1 replaced afterwards kept running as a ReLU. It checks
    again whenever a module of the SE is replaced."""
    torch.manual_seed(0)
    model = randomise_bn(ghostnet_050(fused=False), spread=0.3).double().eval()
    fast = accelerate(copy.deepcopy(model))
    assert type(fast.blocks[3][0].ghost2).__name__ == "SqueezeExciteGhost"
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        fast(x)  # the gate's form checked and cached before the edit
        edit(model.blocks[3][0].se)
        edit(fast.blocks[3][0].ghost2.se)
        expected = model(x)
        assert_close(fast(x), expected, rtol=1e-12)


def test_ghost_depthwise_with_a_replaced_depthwise_conv():
    """GhostDepthwise passed its depthwise module's weight and stride to the merged op whatever
    that module had become: an equivalent nn.Conv2d put there after accelerate() raised inside the
    op (a tuple stride), a Sequential an AttributeError. It runs the two modules in turn now."""
    torch.manual_seed(0)
    model = randomise_bn(ghostnet_050(fused=False), spread=0.3).double().eval()
    fast = accelerate(copy.deepcopy(model))
    merged = fast.blocks[1][0].ghost1
    folded = merged.depthwise
    k = folded.weight.shape[-1]
    conv = nn.Conv2d(folded.weight.shape[0], folded.weight.shape[0], k, folded.stride, k // 2,
                     groups=folded.weight.shape[0]).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(folded.weight)
        conv.bias.copy_(folded.bias)
        expected = model(x)
        for replacement in (conv, nn.Sequential(conv)):
            merged.depthwise = replacement
            assert_close(fast(x), expected, rtol=1e-12)


# -- clear errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(1, 5, 7, 7, dtype=torch.float64), ValueError, "x has 5 channels, expected 6"),
    (torch.randn(1, 6, 7, 7), TypeError, "x is torch.float32"),
    (torch.randn(6, 7, 7, dtype=torch.float64), ValueError, "4-D"),
], ids=["channels", "dtype", "3-d"])
@pytest.mark.parametrize("train", [False, True])
def test_module_bad_input(x, error, match, train):
    with pytest.raises(error, match=match):
        ghost().train(train)(x)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel_size=(3, 5)), TypeError, "kernel_size must be an int or a square pair"),
    (dict(dw_size=[3.0, 3.0]), TypeError, "dw_size must be an int"),
    (dict(kernel_size=(2, 2)), ValueError, "kernel_size must be a positive odd"),
    (dict(ratio=2.5), TypeError, "ratio must be an int"),
    (dict(relu="yes"), TypeError, "relu must be a bool"),
])
def test_module_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ghost(**kwargs)


def test_square_pair_kernel_size():
    assert ghost(kernel_size=(3, 3), dw_size=(5, 5)).primary_conv[0].kernel_size == (3, 3)


def test_accelerate_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        accelerate(None)
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple"):
        accelerate(nn.Conv2d(3, 3, 1), example_inputs=[torch.randn(1, 3, 4, 4)])
    # the model's own error, which says nothing of accelerate(), with a note of where it came from
    with pytest.raises(RuntimeError, match="expected input.* to have 3 channels") as raised:
        accelerate(ghostnet_050(num_classes=10, fused=False).eval(), example_inputs=torch.randn(1, 4, 32, 32))
    if sys.version_info >= (3, 11):
        assert "raised by the original model run on example_inputs" in raised.value.__notes__[0]


# -- hooks and ties ------------------------------------------------------------------------------


class TimmStyleGhost(nn.Module):
    """A Ghost module from another code base (accelerate adopts it by structure)."""

    def __init__(self, inp, oup):
        super().__init__()
        self.out_chs, init = oup, (oup + 1) // 2
        self.primary_conv = nn.Sequential(nn.Conv2d(inp, init, 1, bias=False), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap_operation = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False),
                                             nn.BatchNorm2d(init), nn.ReLU())

    def forward(self, x):
        x1 = self.primary_conv(x)
        return torch.cat([x1, self.cheap_operation(x1)], dim=1)[:, : self.out_chs]


@pytest.mark.parametrize("where", ["module", "child"])
def test_hooked_modules_stay(where):
    net = randomise_bn(nn.Sequential(TimmStyleGhost(4, 8), TimmStyleGhost(8, 8)), spread=0.3).eval()
    hooked = net[0] if where == "module" else net[0].cheap_operation[1]
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    fast = accelerate(net)
    summary = fast.acceleration_summary
    assert summary.fused == ["1"] and summary.skipped[0][0] == "0" and "hooks" in summary.skipped[0][1]
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert_close(fast(x), net(x))


def _forward_wrapped(module, wrap):
    """module.forward set on the instance, as HF accelerate's add_hook_to_module sets it."""
    class_forward = module.forward
    module.forward = lambda *args: wrap(class_forward(*args))
    return module


def test_modules_with_a_forward_set_on_the_instance_stay():
    """A wrapper that keeps the output (a call counter here; HF accelerate's device hooks) passes
    the self-check: the module is left as it is because of the wrapper itself."""
    net = randomise_bn(nn.Sequential(TimmStyleGhost(4, 8), TimmStyleGhost(8, 8)), spread=0.3).eval()
    calls = []
    _forward_wrapped(net[0].cheap_operation[1], lambda out: calls.append(1) or out)
    fast = accelerate(net)
    summary = fast.acceleration_summary
    assert summary.fused == ["1"] and summary.skipped[0][0] == "0"
    assert "BatchNorm2d whose forward is set on the instance" in summary.skipped[0][1]
    calls.clear()
    with torch.no_grad():
        fast(torch.randn(2, 4, 6, 6))
    assert calls == [1]


def test_hooked_bn_is_not_folded():
    net = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), spread=0.3).eval()
    net[1].register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    fast = accelerate(net)
    assert not fast.acceleration_summary.folded and "hooks" in fast.acceleration_summary.skipped[0][1]
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert_close(fast(x), net(x))


# float64 models with random BN statistics, by name, for the tests that hook into them after
# accelerate(): built and accelerated once a process (the self-check is most of such a test's
# time), each test given copies of both.
_HOOKED_MODELS = {
    "ghostnet_050": lambda: ghostnet_050(num_classes=10, fused=False).eval(),
    "ghostnet_050 train": lambda: ghostnet_050(num_classes=10, fused=False).train(),
    "g_ghost_regnetx_002": lambda: models.g_ghost_regnetx("002", fused=False).eval(),
}


@functools.lru_cache(maxsize=None)
def _accelerated_once(name):
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(name.encode()))  # the same model whichever test builds it first
        model = randomise_bn(_HOOKED_MODELS[name](), spread=0.3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a training-mode model's "only its Ghost modules were swapped"
        return model, accelerate(copy.deepcopy(model))


def accelerated_copies(name):
    """(model, accelerate(model)) of _HOOKED_MODELS[name], fresh copies of both."""
    return copy.deepcopy(_accelerated_once(name))


# (a module of the accelerated eval GhostNet 0.5x, the original's module with the same output):
# inside a GhostModule; inside ghost1 + conv_dw merged (GhostDepthwise: the folded conv_dw is
# bn_dw's output, ghost1 is `ghost`); inside SE + ghost2 merged (SqueezeExciteGhost), and its Ghost
# module. In training mode accelerate() merges nothing: the original's names.
_HOOK_SITES = [("blocks.2.0.ghost1.primary_conv.0", "blocks.2.0.ghost1.primary_conv.0"),
               ("blocks.2.0.ghost1.cheap_operation.1", "blocks.2.0.ghost1.cheap_operation.1"),
               ("blocks.1.0.ghost1.ghost.primary_conv.2", "blocks.1.0.ghost1.primary_conv.2"),
               ("blocks.1.0.ghost1.depthwise", "blocks.1.0.bn_dw"),
               ("blocks.3.0.ghost2.se.conv_reduce", "blocks.3.0.se.conv_reduce"),
               ("blocks.3.0.ghost2.ghost", "blocks.3.0.ghost2")]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("site", _HOOK_SITES, ids=[fast for fast, _ in _HOOK_SITES])
def test_hooks_registered_after_accelerate_run(site, training):
    """A hook registered on a layer inside a fused module after accelerate() (feature capture,
    an edit of the output) ran never: the fused op computes that layer without calling it, and the
    logits came back as if there were no hook. The fused module now runs its layers in turn."""
    model, fast = accelerated_copies("ghostnet_050 train" if training else "ghostnet_050")
    fast_site, original_site = (site[1], site[1]) if training else site
    captured = {}

    def edit(module, args, out):
        captured[module] = out
        return out * 2

    for net, name in ((model, original_site), (fast, fast_site)):
        net.get_submodule(name).register_forward_hook(edit)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        outputs = []
        for net in (model, fast):
            torch.manual_seed(0)  # the same dropout mask in training mode
            outputs.append(net(x))
    assert_close(outputs[1], outputs[0])
    hooked = fast.get_submodule(fast_site)
    assert_close(captured[hooked], captured[model.get_submodule(original_site)])


@pytest.mark.parametrize("site", _HOOK_SITES, ids=[fast for fast, _ in _HOOK_SITES])
def test_forwards_set_on_the_instance_after_accelerate_run(site):
    """As a hook: the fused op computed the layer without calling its instance's forward."""
    model, fast = accelerated_copies("ghostnet_050")
    for net, name in ((model, site[1]), (fast, site[0])):
        _forward_wrapped(net.get_submodule(name), lambda out: out * 2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), model(x))


# Modules of the eval GhostNet 0.5x that accelerate() merges (ghost1 with conv_dw, se with ghost2)
# or leaves a placeholder in (conv_dw, se), under the original's names.
_MERGE_SITES = ["blocks.1.0.ghost1", "blocks.1.0.conv_dw", "blocks.3.0.se", "blocks.3.0.ghost2"]


@pytest.mark.parametrize("site", _MERGE_SITES)
def test_hooks_on_merged_modules_and_their_placeholders_see_the_original_tensors(site):
    """A hook registered after accelerate() on a merged module or the placeholder left in its
    sibling's place saw the merged op's tensors: on se the SE's input passed through (not x *
    gate), on ghost1 the stride-2 depthwise conv's output, on ghost2 the SE's input. While a hook is
    there, the two run their own modules (modules.MergedAway): each hook sees the original's input
    and output (conv_dw's output with bn_dw folded in, as every folded conv's), and an edit of the
    output reaches the logits as in the original."""
    model, fast = accelerated_copies("ghostnet_050")
    assert type(fast.get_submodule(site)).__name__ in ("GhostDepthwise", "MergedAway", "SqueezeExciteGhost")
    folded = site.endswith("conv_dw")  # its output is bn_dw's: no edit there, which bn_dw's shift would not commute with
    captured = []

    def capture_and_edit(module, args, out):
        captured.append((args[0], out))
        return None if folded else out * 2

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = []
        for net in (model, fast):
            net.get_submodule(site).register_forward_hook(capture_and_edit)
            logits.append(net(x))
        (original_input, original_output), (fast_input, fast_output) = captured
        if folded:
            original_output = model.blocks[1][0].bn_dw(original_output)
    assert_close(fast_input, original_input)
    assert_close(fast_output, original_output)
    assert_close(logits[1], logits[0])


class _LeafTracer(torch.fx.Tracer):
    """torch.fx tracing with ghostkernels' modules as leaves (the README's advice)."""

    def is_leaf_module(self, module, qualified_name):
        return type(module).__module__.startswith("ghostkernels") or super().is_leaf_module(module, qualified_name)


def test_torch_fx_symbolic_trace_says_how_and_leaves_the_model_as_it_was():
    """torch.fx.symbolic_trace (torchvision's feature extraction, FX quantization) of an accelerated
    model raised "x must be a 4-D tensor, got Proxy", and the trace left its proxies in the Ghost
    modules' fold caches: every later forward of the model raised a TraceError. Now a TypeError
    says how (leaves), the model runs on as before, and traced with its modules as leaves it gives
    its outputs."""
    model, fast = accelerated_copies("ghostnet_050")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(TypeError, match="symbolic trace cannot go through the fused modules.*as leaves"):
            torch.fx.symbolic_trace(fast)
        assert_close(fast(x), expected)
        traced = torch.fx.GraphModule(fast, _LeafTracer().trace(fast))
        assert_close(traced(x), expected)


def test_hooks_on_every_module_split_the_merges_only_while_registered():
    """A summary tool hooks every module (torchinfo, thop): the placeholders then run their modules,
    the merged modules leave them out, so ghost1, conv_dw and se report the original's shapes and
    the logits stay the original's; the hooks removed, the placeholders pass their input through
    again and the merged ops run."""
    model, fast = accelerated_copies("ghostnet_050")
    placeholders = [m for m in fast.modules() if type(m) is modules.MergedAway]
    assert len(placeholders) >= 2
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        (expected, original_shapes), (logits, shapes) = module_output_shapes(model, x), module_output_shapes(fast, x)
        assert_close(logits, expected)
        names = ("blocks.1.0.ghost1", "blocks.1.0.conv_dw", "blocks.3.0.se")
        assert [shapes[name] for name in names] == [original_shapes[name] for name in names]
        y = torch.randn(1, 8, 4, 4, dtype=torch.float64)
        assert all(placeholder(y) is y for placeholder in placeholders)
        assert_close(fast(x), expected)


@pytest.mark.parametrize("site", ["blocks.1.0.ghost1", "blocks.3.0.se", "blocks.3.0.ghost2"])
def test_merged_modules_and_placeholders_replaced_after_accelerate(site):
    """Model surgery after accelerate(): a module put in the place of a merged module or of the
    placeholder beside it was left out or broke the model (a new se: the merged SE ran instead;
    a new ghost2: the SE was lost). Now the two split for good, each place runs its module, and
    the model computes what the original so edited does."""
    model, fast = accelerated_copies("ghostnet_050")
    replacement = perturbed(model.get_submodule(site))
    for net in (model, fast):
        net.set_submodule(site, copy.deepcopy(replacement))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), model(x))


@pytest.mark.parametrize("conv, bn", [("conv_stem", "bn1"), ("blocks.1.0.conv_dw", "blocks.1.0.bn_dw"),
                                      ("blocks.1.0.shortcut.0", "blocks.1.0.shortcut.1")])
def test_folded_pairs_replaced_after_accelerate(conv, bn):
    """A folded BN's values live in its conv: another module in the BN's place alone would apply a
    second BN (it was accepted silently), so it is refused; the conv replaced takes the values with
    it, so the BN's place raises until it too holds a module; both replaced, conv first, the model
    computes what the original so edited does (conv_dw: its placeholder, ghost1 then runs alone)."""
    model, fast = accelerated_copies("ghostnet_050")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"folded the BatchNorm at .* Replace '{conv.rpartition('.')[2]}' first"):
        fast.set_submodule(bn, copy.deepcopy(model.get_submodule(bn)))
    new_conv, new_bn = perturbed(model.get_submodule(conv)), perturbed(model.get_submodule(bn))
    model.set_submodule(conv, new_conv)
    model.set_submodule(bn, new_bn)
    fast.set_submodule(conv, copy.deepcopy(new_conv))
    with torch.no_grad(), pytest.raises(RuntimeError, match="has since been replaced or removed, and the BN's values went with it"):
        fast(x)
    fast.set_submodule(bn, copy.deepcopy(new_bn))
    with torch.no_grad():
        assert_close(fast(x), model(x))


# A stride-2 bottleneck's shortcut: conv_dw (0), its BN (1), the 1x1 conv (2), its BN (3), both BNs folded
_SHORTCUT = "blocks.1.0.shortcut"


@pytest.mark.parametrize("edit", [lambda s: s.insert(1, nn.Hardswish()), lambda s: s.insert(-1, nn.Hardswish()),
                                  lambda s: s.__delitem__(1), lambda s: s.pop(3), lambda s: s.__delitem__(slice(1, 3)),
                                  lambda s: delattr(s, "3")],
                         ids=["insert between", "insert before the last", "del BN", "pop BN", "del BN and next conv",
                              "delattr BN"])
def test_sequential_edits_that_would_split_a_folded_pair_are_refused(edit):
    """nn.Sequential's insert, del and pop write its module dict directly, where no registration
    hook sees them: a module inserted between a folded conv and its BN, or the BN removed alone,
    gave other outputs silently (1e-4 to 2e-3 relative). Now refused, the Sequential unchanged."""
    model, fast = accelerated_copies("ghostnet_050")
    with pytest.raises(RuntimeError, match="accelerate\\(\\) folded"):
        edit(fast.get_submodule(_SHORTCUT))
    assert len(fast.get_submodule(_SHORTCUT)) == 4
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), model(x))


@pytest.mark.parametrize("edits", [[lambda s: s.insert(0, nn.Hardswish())], [lambda s: s.insert(2, nn.Hardswish())],
                                   [lambda s: s.append(nn.Hardswish())],
                                   [lambda s: s.insert(0, nn.Hardswish()), lambda s: s.insert(0, nn.Hardswish())],
                                   [lambda s: s.insert(0, nn.Hardswish()), lambda s: s.__delitem__(0)]],
                         ids=["insert first", "insert between pairs", "append", "insert first twice",
                              "insert then delete"])
def test_sequential_edits_around_folded_pairs_after_accelerate(edits):
    """Edits that keep each folded conv right before its BN give the original's outputs so edited,
    and the pairs' names follow the renumbering (a BN alone replaced is still refused)."""
    model, fast = accelerated_copies("ghostnet_050")
    for net in (model, fast):
        for edit in edits:
            edit(net.get_submodule(_SHORTCUT))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), model(x))
    shortcut = fast.get_submodule(_SHORTCUT)
    assert repr(shortcut).startswith("Sequential(")
    for key, module in shortcut.named_children():
        if type(module).__name__ == "FoldedBatchNorm":
            conv = str(int(key) - 1)
            assert module.folded_into == f"{_SHORTCUT}.{conv}"
            with pytest.raises(RuntimeError, match=f"Replace '{conv}' first"):
                shortcut[int(key)] = nn.BatchNorm2d(module.num_features)


def test_sequential_conv_removed_after_accelerate():
    """A folded conv removed from its Sequential takes the BN's values with it: the BN raises."""
    model, fast = accelerated_copies("ghostnet_050")
    del fast.get_submodule(_SHORTCUT)[2]
    with torch.no_grad(), pytest.raises(RuntimeError, match="replaced or removed, and the BN's values went with it"):
        fast(torch.randn(2, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ghostnet_050", "ghostnet_050 train"])
@pytest.mark.parametrize("layer", [nn.ReLU, nn.Hardswish])
def test_ghost_module_branch_starting_with_another_layer(name, layer):
    """A fused Ghost module's branch given another first layer runs its layers, as the original
    does; the input check read that layer's weight (an AttributeError)."""
    model, fast = accelerated_copies(name)
    for net in (model, fast):
        net.get_submodule("blocks.2.0.ghost1.primary_conv").insert(0, layer())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.random.fork_rng():  # the classifier's dropout in training mode
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        assert_close(fast(x), expected)


@pytest.mark.parametrize("intercept", ["hook", "instance forward"])
@pytest.mark.parametrize("site", ["cheap", "merge", "merge.0", "cheap_relu", "layers.1", "layers.1.relu"])
def test_hooks_registered_after_accelerate_run_in_g_ghost_stages(site, intercept):
    """The fast path of an accelerated G-GhostNet stage computes its last inner block, the merge,
    the cheap conv and its ReLU without calling those modules: a hook on one of them now sends the
    stage through the original ops. (A hook on the cheap conv itself sees its BN folded in.)"""
    model, fast = accelerated_copies("g_ghost_regnetx_002")
    assert type(fast.layer3).__name__ == "GGhostStage"
    for net in (model, fast):
        if intercept == "hook":
            net.get_submodule(f"layer3.{site}").register_forward_hook(lambda module, args, out: out * 2)
        else:
            _forward_wrapped(net.get_submodule(f"layer3.{site}"), lambda out: out * 2)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fast(x), model(x))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_global_module_hooks(family):
    """register_module_forward_hook fires for every module call: the fused ops' layers were never
    called, so a global hook that edits the BNs' outputs left the accelerated logits unchanged."""
    model = randomise_bn(FAMILIES[family](), spread=0.3).double().eval()
    fast, x = accelerate(copy.deepcopy(model)), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 2 if isinstance(module, nn.BatchNorm2d) else None)
    try:
        with torch.no_grad():
            assert_close(fast(x), model(x))
    finally:
        handle.remove()


def _prune(model):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(m, "weight", amount=0.3)


def _old_weight_norm(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            torch.nn.utils.weight_norm(m)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("reparameterise", [_prune, _old_weight_norm], ids=["prune", "weight_norm"])
def test_pruned_and_weight_normed_models(reparameterise, training):
    """Their pre-hooks leave a computed weight that deepcopy refused and the swaps could not
    take (accelerate raised). Now the copy works and the hooked modules stay as they are."""
    model = randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.3).train(training)
    reparameterise(model)
    with pytest.warns(UserWarning) if training else contextlib.nullcontext():
        fast = accelerate(model)
    assert any("prune.remove() / remove_weight_norm()" in why for _, why in fast.acceleration_summary.skipped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(0)  # the classifier's dropout in training mode
        expected = model(x)
        torch.manual_seed(0)
        assert_close(fast(x), expected)
        if not training:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # their hooks' weights are recorded: nothing to warn of
                assert_close(freeze(fast, x)(x), expected)


def test_a_models_copy_shares_no_container_with_it():
    """accelerate()'s copies (of the model, and of each changed scope its self-check runs) give every
    empty dict and set a fresh one up front: the copy must still be what copy.deepcopy makes, with
    hooks, caches and buffers of its own."""
    model = ghostnet_050(num_classes=10, fused=False).eval()
    model.blocks[0].cache = {}  # a user's attribute, empty
    model.blocks[1].seen = {"images": 0}
    copied, expected = modules.deepcopy_module(model), copy.deepcopy(model)
    for (name, original), mine, theirs in zip(model.named_modules(), copied.modules(), expected.modules()):
        assert type(mine) is type(theirs) and vars(mine).keys() == vars(theirs).keys(), name
        for key, value in vars(mine).items():
            assert type(value) is type(vars(theirs)[key]), f"{name}.{key}"
            if isinstance(value, (dict, set, list, torch.Tensor)):
                assert value is not vars(original)[key], f"{name}.{key} is the original's"
    calls = []
    copied.blocks[0].register_forward_hook(lambda *_: calls.append("copy"))
    copied.blocks[0].cache["x"] = 1
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), copied(x))
    assert calls == ["copy"] and model.blocks[0].cache == {} and not model.blocks[0]._forward_hooks


def test_shared_ghost_module_stays_shared():
    shared = TimmStyleGhost(6, 6)
    net = randomise_bn(nn.Sequential(shared, nn.ReLU(), shared), spread=0.3).eval()
    fast = accelerate(net)
    assert isinstance(fast[0], GhostModule) and fast[0] is fast[2]
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        assert_close(fast(x), net(x))


def test_conv_shared_between_two_folds_is_left():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = randomise_bn(nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3)), spread=0.3).eval()
    fast = accelerate(net)
    assert not fast.acceleration_summary.folded
    assert all("shared" in why for _, why in fast.acceleration_summary.skipped)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert_close(fast(x), net(x))


# -- the self-check --------------------------------------------------------------------------------


def test_self_check_undoes_a_sabotaged_swap(monkeypatch):
    """A swap that drops the activation: the check measures the difference and undoes it. (The
    branches lose their ReLUs too: a GhostModule whose branches disagree with its activation runs
    them as they are, right.)"""
    swap = acceleration._swap_ghost

    def sabotaged(module, activation, gate):
        fused = swap(module, "none", gate)  # new Sequentials: the replaced module keeps its own
        fused.primary_conv = nn.Sequential(*fused.primary_conv[:2], nn.Identity())
        fused.cheap_operation = nn.Sequential(*fused.cheap_operation[:2], nn.Identity())
        return fused

    monkeypatch.setattr(acceleration, "_swap_ghost", sabotaged)
    net = randomise_bn(nn.Sequential(TimmStyleGhost(4, 8)), spread=0.3).eval()
    x = torch.randn(2, 4, 6, 6)
    unchecked = accelerate(net, check=False)
    checked = accelerate(net)
    with torch.no_grad():
        assert (unchecked(x) - net(x)).abs().max() > 1e-2  # the sabotage is real
        assert_close(checked(x), net(x))
    summary = checked.acceleration_summary
    assert not summary.fused and summary.skipped[0][0] == "0"
    assert "self-check: output differs by" in summary.skipped[0][1]


def test_self_check_undoes_a_fold_that_drops_an_activation(monkeypatch):
    """The old BatchNormAct2d bug, forced: its act is dropped, the check puts it back."""

    class BatchNormAct2d(nn.BatchNorm2d):
        def __init__(self, channels):
            super().__init__(channels)
            self.drop, self.act = nn.Identity(), nn.ReLU()

        def forward(self, x):
            return self.act(self.drop(super().forward(x)))

    monkeypatch.setattr(acceleration, "_bn_replacement", lambda bn, folded_into, conv_attribute: nn.Identity())
    net = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4)), spread=0.3).eval()
    fast = accelerate(net)
    assert not fast.acceleration_summary.folded and "self-check" in fast.acceleration_summary.skipped[0][1]
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert_close(fast(x), net(x))


class _StemWithFeatures(nn.Module):
    """A stem with timm's feature API: forward_intermediates returns the conv's output before the BN,
    or, where it takes a required `indices`, nothing a probe calls."""

    def __init__(self, indices_required=False):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.indices_required = indices_required

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_intermediates(self, x, *indices):
        if self.indices_required and not indices:
            raise TypeError("forward_intermediates() missing 1 required positional argument: 'indices'")
        z = self.conv(x)
        return self.act(self.bn(z)), [z]


@pytest.mark.parametrize("indices_required", [False, True], ids=["runs", "needs_arguments"])
def test_self_check_compares_forward_intermediates(indices_required):
    """A fold that keeps forward right but changes what forward_intermediates returns is undone,
    with that method named; one the probe cannot call leaves the check to forward."""
    net = randomise_bn(_StemWithFeatures(indices_required), spread=0.3).eval()
    fast, x = accelerate(net), torch.randn(2, 3, 5, 5)
    summary = fast.acceleration_summary
    with torch.no_grad():
        assert_close(fast(x), net(x))
        if indices_required:
            assert summary.folded == ["conv+bn"] and not summary.skipped
            return
        assert_close(fast.forward_intermediates(x)[1][0], net.forward_intermediates(x)[1][0])
    assert not summary.folded
    assert summary.skipped[0][0] == "conv+bn" and "forward_intermediates() output" in summary.skipped[0][1]


DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_self_check_runs_in_float64_on_the_cpu(monkeypatch, device):
    """Whatever the model's device, the probes run in float64 on the CPU, where the tolerance
    can be tight: a fold off by 1e-3 (an eps that is not the BN's, say), which a float32 check
    with TF32 dots could not tell from rounding, is caught and undone on a GPU model too."""
    settings = []
    run = acceleration._SelfCheck._run
    monkeypatch.setattr(acceleration._SelfCheck, "_run",
                        lambda self, module, args, kwargs, setting, methods=(): settings.append(setting) or run(
                            self, module, args, kwargs, setting, methods))
    fold = acceleration.fold_conv_bn
    monkeypatch.setattr(acceleration, "fold_conv_bn", lambda conv, bn: [t * (1 + 1e-3) for t in fold(conv, bn)])
    net = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), TimmStyleGhost(4, 8)), 0.3)
    fast = accelerate(net.eval().to(device))
    summary = fast.acceleration_summary
    assert summary.fused == ["2"] and not summary.folded
    assert "self-check: output differs" in dict(summary.skipped)["0+1"]
    assert set(settings) == {(torch.device("cpu"), torch.float64)}
    assert next(fast.parameters()).device.type == device  # the model stays where it was
    x = torch.randn(1, 3, 5, 5, device=device)
    with torch.no_grad():
        assert_close(fast(x), net(x), rtol=1e-5 if device == "cpu" else 1e-2)


class FixedSize(nn.Module):
    """Its head takes 7x7 maps only: no synthetic probe runs the whole model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = TimmStyleGhost(8, 8)
        self.head = nn.Linear(8 * 7 * 7, 4)

    def forward(self, x):
        return self.head(self.block(self.bn(self.conv(x))).flatten(1))


def test_example_inputs_reach_modules_synthetic_probes_cannot():
    net = randomise_bn(FixedSize(), spread=0.3).eval()
    x = torch.randn(1, 3, 7, 7)
    blind = accelerate(net).acceleration_summary
    assert blind.fused == ["block"] and "pass example_inputs" in dict(blind.skipped)["conv+bn"]
    fast = accelerate(net, example_inputs=x)
    assert fast.acceleration_summary.folded == ["conv+bn"] and not fast.acceleration_summary.skipped
    with torch.no_grad():
        assert_close(fast(x), net(x))


def test_example_probes_keep_two_images():
    """A batch of 64 in example_inputs probes with its first two images (the check runs in float64
    on the CPU); inputs whose first dimensions differ (not a batch) are kept whole."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = TimmStyleGhost(4, 8)

        def forward(self, x, scale):
            return self.block(x) * scale

    net = randomise_bn(TwoInputs(), spread=0.3).eval()
    x, scale = torch.randn(64, 4, 9, 9), torch.randn(8, 1, 1)
    check = acceleration._SelfCheck(net, (x, scale))
    assert check.captured["block"][0][0].shape == (2, 4, 9, 9)
    assert [t.shape for t in check.captured[""][0]] == [x.shape, scale.shape]
    fast = accelerate(net, example_inputs=(x, scale))
    assert fast.acceleration_summary.fused == ["block"]
    with torch.no_grad():
        assert_close(fast(x, scale), net(x, scale))


def test_training_mode_check_with_dropout():
    net = nn.Sequential(TimmStyleGhost(4, 8), nn.Dropout(0.5), TimmStyleGhost(8, 8)).train()
    state = torch.random.get_rng_state()
    fast = accelerate(net)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probes leave the caller's RNG alone
    assert fast.acceleration_summary.fused == ["0", "2"] and fast.acceleration_summary.checked == 2


def test_training_mode_acceleration_says_what_it_leaves():
    net = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), TimmStyleGhost(4, 8)), 0.3)
    with pytest.warns(UserWarning, match="training mode.*call model.eval"):
        fast = accelerate(net.train())
    assert fast.acceleration_summary.fused == ["2"] and not fast.acceleration_summary.folded


def test_check_false_skips_the_probes():
    fast = accelerate(nn.Sequential(TimmStyleGhost(4, 8)).eval(), check=False)
    assert fast.acceleration_summary.checked == 0 and fast.acceleration_summary.fused == ["0"]


def test_zoo_ghostnet_checked_with_example_inputs():
    model = randomise_bn(ghostnet_050(num_classes=10, fused=False), spread=0.2).eval()
    x = torch.randn(1, 3, 64, 64)
    fast = accelerate(model, example_inputs=x)
    summary = fast.acceleration_summary
    assert not summary.skipped and summary.checked == len(summary.fused) + len(summary.folded) + len(
        summary.matmul) + len(summary.merged) + len(summary.residual)
    with torch.no_grad():
        assert_close(fast(x), model(x))
    copy.deepcopy(fast)  # after a forward too: the fold caches hold plain tensors, not graph nodes
