"""accelerate() never changes outputs: small networks built at random from the blocks of current
timm's and Huawei's GhostNet code (test-local copies), in random order."""

import random

import huawei_ghostnet as huawei
import pytest
import timm_ghostnet as timm
import torch
from conftest import assert_training_like_eager, intra_op_threads, randomise_bn, training_results
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
