"""A 1x1 conv, its activation and a global average pool: `ghostkernels::pointwise_conv2d_pool`.

GhostNet ends `blocks[-1]` (1x1 conv 160 -> 960 + BN + ReLU at 7x7) -> `global_pool`: the
conv writes a 960 x 7 x 7 map that the pool reads back once to average it. freeze() finds that
chain in its graph (a `pointwise_conv2d` whose only use is an optional ReLU whose only use is
`adaptive_avg_pool2d(_, 1)`) and makes it this op, which the C++ kernel
(csrc/pointwise_conv_cpu.cpp) runs per block of output channels: the GEMM's rows go into a
cache-sized scratch and are averaged there. Elsewhere (CUDA, other dtypes, channels_last x) it
is the conv, the activation and the mean, and gradients recompute that composition.
"""

import torch
import torch.nn.functional as F

from . import ops
from .modules import check_pointwise, without_epilogue
from .reference import ACTIVATIONS, check_activation

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
_lib.define("pointwise_conv2d_pool(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor")

_OP = "ghostkernels::pointwise_conv2d_pool"


def _check(x, weight, bias, activation):
    check_pointwise("pointwise_conv2d_pool", x, weight, bias)
    check_activation("pointwise_conv2d_pool", activation)


def _composed(x, weight, bias, activation):
    _check(x, weight, bias, activation)
    z = F.conv2d(x, weight, bias)
    return ACTIVATIONS[activation](z).mean((2, 3), keepdim=True).contiguous()


@torch.library.register_fake(_OP)
def _fake(x, weight, bias, activation):
    _check(x, weight, bias, activation)
    return x.new_empty((x.shape[0], weight.shape[0], 1, 1))


torch.library.impl(_lib, "pointwise_conv2d_pool", "CompositeExplicitAutograd")(_composed)
ops.register_recompute_autograd("pointwise_conv2d_pool", _composed)

_POOLS = ("aten::adaptive_avg_pool2d",)


def fuse_pointwise_pools(graph):
    """Rewrites a TorchScript graph in place: every `adaptive_avg_pool2d(_, 1)` (or [1, 1]) of a
    `pointwise_conv2d`'s output, through at most one ReLU, each intermediate used only there,
    becomes one `pointwise_conv2d_pool`. Returns the number of chains fused."""
    fused = 0
    for pool in list(graph.nodes()):
        if pool.kind() not in _POOLS:
            continue
        source, size = pool.inputs()
        if ops.graph_constant(size) not in (1, [1, 1], (1, 1)) or len(source.uses()) != 1:
            continue
        activation, producer = "none", source.node()
        if producer.kind() in ops.GRAPH_ACTIVATIONS:
            activation = ops.GRAPH_ACTIVATIONS[producer.kind()]
            conv_out = producer.inputsAt(0)
            if len(conv_out.uses()) != 1:
                continue
            producer = conv_out.node()
        if (producer.kind() != "ghostkernels::pointwise_conv2d" or not without_epilogue(producer)
                or ops.graph_constant(producer.inputsAt(3)) != 1):
            continue
        name = graph.insertConstant(activation)
        name.node().moveBefore(pool)
        chain = [producer, pool] if source.node() is producer else [producer, source.node(), pool]
        ops.replace_chain(graph, _OP, [*list(producer.inputs())[:3], name], chain)
        fused += 1
    return fused
