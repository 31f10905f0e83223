"""accelerate() never changes outputs: small networks built at random from the blocks of current
timm's and Huawei's GhostNet code (test-local copies), in random order."""

import copy
import random

import huawei_ghostnet as huawei
import pytest
import timm_ghostnet as timm
import torch
from conftest import assert_training_like_eager, intra_op_threads, perturbed, randomise_bn, training_results
from torch import nn

from ghostkernels import accelerate

# One intra-op thread for a third of the seeds (many calls on tiny tensors), 2 and 3 for the others: the
# kernels' work split over threads, evenly or not, in networks that meet each op in several shapes.
THREADS = (1, 2, 3)

def random_block(rng, in_chs, stride):
    """One block of the timm / Huawei code bases, (module, out_chs), with random widths,
    kernel sizes, SE, activations and modes."""
    out_chs, mid_chs, se = rng.choice([8, 12, 16]), rng.choice([12, 24, 36]), rng.choice([0.0, 0.25])
    dw = rng.choice([3, 5])
    makers = [
        lambda: timm.GhostBottleneck(in_chs, mid_chs, out_chs, dw, stride, se_ratio=se,
                                     mode=rng.choice(["original", "attn"])),
        lambda: timm.GhostBottleneckV3(in_chs, mid_chs, out_chs, dw, stride, se_ratio=se,
                                       mode=rng.choice(["original", "shortcut"])),
        lambda: huawei.GhostBottleneck(in_chs, mid_chs, out_chs, dw, stride, se_ratio=se),
        lambda: huawei.GhostBottleneckV2(in_chs, mid_chs, out_chs, dw, stride, se_ratio=se,
                                         layer_id=rng.choice([0, 2])),
        lambda: huawei.V3.GhostBottleneck(in_chs, mid_chs, out_chs, dw, stride, se_ratio=se,
                                          layer_id=rng.choice([0, 2])),
        lambda: timm.ConvBnAct(in_chs, out_chs, rng.choice([1, 3]), stride,
                               act_layer=rng.choice([nn.ReLU, nn.SiLU, None])),
        lambda: huawei.ConvBnAct(in_chs, out_chs, 1, stride),
        lambda: timm.GhostModule(in_chs, out_chs, ratio=rng.choice([2, 3]), stride=stride,
                                 act_layer=rng.choice([nn.ReLU, nn.Identity, nn.Hardswish])),
        lambda: huawei.GhostModule(in_chs, out_chs, kernel_size=rng.choice([1, 3]), stride=stride,
                                   relu=rng.choice([True, False])),
        lambda: nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False),
                              timm.BatchNormAct2d(out_chs, act_layer=rng.choice([nn.ReLU, nn.GELU, None]),
                                                  drop_layer=rng.choice([None, lambda: nn.Dropout(0.3)]))),
    ]
    return rng.choice(makers)(), out_chs


def random_network(seed):
    rng = random.Random(seed)
    layers, chs = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    strides = [2, 2] + [1] * rng.randint(2, 4)
    rng.shuffle(strides)
    for stride in strides:
        block, chs = random_block(rng, chs, stride)
        layers.append(block)
    return nn.Sequential(*layers)


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("seed", range(8))
def test_accelerate_never_changes_outputs(seed):
    net = randomise_bn(random_network(seed), spread=0.2).eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad(), intra_op_threads(THREADS[seed % len(THREADS)]):
        expected = net(x)
        for check in (False, True):
            fast = accelerate(net, check=check)
            assert relative_error(fast(x), expected) <= 1e-5, fast.acceleration_summary
    # The recognition is right for these blocks: the self-check had nothing to undo.
    assert not [why for _, why in fast.acceleration_summary.skipped if "self-check" in why]
    assert "0+1" in fast.acceleration_summary.folded  # the stem, at least


@pytest.mark.parametrize("seed", range(3))
def test_accelerate_in_training_mode_keeps_outputs_and_gradients(seed):
    """assert_training_like_eager: float32 outputs as close to float64 as eager float32's, the
    accelerated network's gradients in float64 those of the network in float64."""
    net = randomise_bn(random_network(100 + seed), spread=0.2).train()
    with intra_op_threads(THREADS[seed % len(THREADS)]):
        results = training_results(net, torch.randn(2, 3, 33, 33), dropout_seed=seed)[0]
    assert_training_like_eager(results)


def _hooked_run(net, x, sites):
    """net's output on x, x's gradient of its first logits' sum, and {name: tensors recorded} with a
    hook of each (name, kind) of `sites` on the module of that name: "edit" scales its output,
    "pre" its input, "record" keeps its output. (No full backward hooks: eager PyTorch refuses them
    on the many outputs these networks change in place, a ReLU's or the residual add's.)"""
    recorded, handles = {}, []
    for name, kind in sites:
        module = net.get_submodule(name)
        if kind == "edit":
            handles.append(module.register_forward_hook(lambda m, args, out: out * 1.5))
        elif kind == "pre":
            handles.append(module.register_forward_pre_hook(lambda m, args: (args[0] * 0.5, *args[1:])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: recorded.setdefault(name, []).append(out.detach().clone())))
    x = x.clone().requires_grad_()
    try:
        out = net(x)
        out[:, :3].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return out.detach(), x.grad, recorded


@pytest.mark.parametrize("seed", range(4))
def test_hooks_registered_after_accelerate_see_what_they_see_in_the_original(seed):
    """Hooks put after accelerate() on modules both networks name (not a folded BN or its conv, which
    see the BN's output as the README says), a merged module or its placeholder among them where
    there is one: outputs, recorded tensors and x's gradient as in the original (float64). A hook on
    se saw ghost1's output before, one on ghost1 merged with conv_dw the depthwise conv's."""
    rng = random.Random(seed)
    net = randomise_bn(random_network(200 + seed), spread=0.3).double().eval()
    fast = accelerate(net)
    folded = {folded_name for name, m in fast.named_modules() if type(m).__name__ == "FoldedBatchNorm"
              for folded_name in (name, m.folded_into)}
    original = dict(net.named_modules())
    names = [name for name, _ in fast.named_modules() if name and name in original and name not in folded]
    merged = [name for name in names if type(fast.get_submodule(name)).__name__ in
              ("MergedAway", "GhostDepthwise", "SqueezeExciteGhost")]
    picks = set(rng.sample(names, 3)) | set(rng.sample(merged, min(2, len(merged))))
    sites = [(name, rng.choice(["edit", "pre", "record"])) for name in sorted(picks)]
    x = torch.randn(1, 3, 25, 25, dtype=torch.float64)
    (expected, expected_grad, expected_recorded), (out, grad, recorded) = (_hooked_run(m, x, sites) for m in (net, fast))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert recorded.keys() == expected_recorded.keys()
    for name, tensors in expected_recorded.items():
        torch.testing.assert_close(recorded[name], tensors, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_modules_replaced_after_accelerate(seed):
    """Model surgery after accelerate(): a module both networks name, replaced in both by the same
    new one (other weights). The accelerated network computes what the original so edited does,
    or refuses with an error naming accelerate() (a folded BN whose conv holds its values); before,
    a replaced BN, conv, SE, ghost1 or ghost2 of a merge or fold was left out or broke the model."""
    rng = random.Random(seed)
    net = randomise_bn(random_network(300 + seed), spread=0.3).double().eval()
    fast = accelerate(net)
    original = dict(net.named_modules())
    names = [name for name, _ in fast.named_modules() if name and name in original]
    x = torch.randn(1, 3, 25, 25, dtype=torch.float64)
    for name in rng.sample(names, 6):
        edited, edited_fast, replacement = copy.deepcopy(net), copy.deepcopy(fast), perturbed(original[name], seed)
        edited.set_submodule(name, replacement)
        with torch.no_grad():
            try:
                edited_fast.set_submodule(name, copy.deepcopy(replacement))
                out = edited_fast(x)
            except RuntimeError as error:
                assert "ghostkernels.accelerate() folded" in str(error), name
                continue
            torch.testing.assert_close(out, edited(x), rtol=1e-9, atol=1e-12, msg=name)
