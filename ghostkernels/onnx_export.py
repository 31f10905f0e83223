"""ONNX export of models that use ghostkernels: every op as standard ONNX ops.

The fused ops are custom `torch.library` ops, which no ONNX exporter knows; the exported graph
must hold Conv, Relu, Concat, Slice, Sigmoid, Resize, Mul, Add, ReduceMean, HardSigmoid... and
nothing of ghostkernels. For the library's modules and functions nothing is to be passed:
`import ghostkernels` is enough.

- `dynamo=False` (TorchScript tracing, eager): while `torch.onnx.is_in_onnx_export()`, the
  library's entry points (`ops.call`, hence every module forward and the functional
  `ghost_module` / `cheap_mix`) run each op's ATen composition instead of the op
  (`ops.onnx_exporting`). A model that calls `torch.ops.ghostkernels.<op>` itself gets a
  TorchScript symbolic function per op (opset >= 11).
- `dynamo=True` (torch.export): the flag holds through the exporter's torch.export capture
  too, so the same entry points put the compositions into the captured graph. An op called as
  `torch.ops.ghostkernels.<op>` stays an op there, which the exporter cannot translate:
  decompose the program first with `decompositions()`, as an `ExportedProgram` made outside
  the exporter must be (`torch.export.export(...).run_decompositions(decompositions())`).
  They are not registered in `torch._decomp.decomposition_table`: inductor refuses to compile
  an op with a global decomposition as a fallback kernel when the environment sets `CI`.

`cheap_mix_into` (in place, into a slice) has neither: the library never calls it while
exporting (GGhostStage then takes the functional path, as under torch.compile).
"""

import torch

from . import cheap_mix as _cheap_mix
from . import dfc_attention, direct_conv, modules, pointwise_pool, squeeze_excite
from .reference import conv_output_format, ghost_module_reference, output_memory_format, upsampled_gate

__all__ = ["COMPOSITIONS", "composed", "decompositions"]


def _ghost_module(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation):
    return ghost_module_reference(x, primary_weight, primary_bias, cheap_weight, cheap_bias,
                                  out_channels=out_channels, stride=stride, activation=activation)


def _ghost_module_gated(x, primary_weight, primary_bias, cheap_weight, cheap_bias, gate, out_channels, stride,
                        activation):
    # upsampled_gate: an ONNX Resize, as GhostNetV2's own export has, not the reference's gather
    ungated = _ghost_module(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    return ungated * upsampled_gate(gate, ungated.shape[-2:])


def _ghost_module_depthwise(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                            activation, depthwise_weight, depthwise_bias, depthwise_stride):
    ghost = _ghost_module(x, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride, activation)
    return direct_conv._fallback(ghost, depthwise_weight, depthwise_bias, depthwise_stride)


def _ghost_module_scaled(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                         activation):
    return _ghost_module(x * scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                         activation)


def _ghost_module_residual(x, scale, primary_weight, primary_bias, cheap_weight, cheap_bias, out_channels, stride,
                           activation, residual, alpha=1):
    ghost = _ghost_module(x if scale is None else x * scale, primary_weight, primary_bias, cheap_weight, cheap_bias,
                          out_channels, stride, activation)
    # add_'s result (the Ghost output's dtype), out of place: the exporters' functionalisation
    # fails on an in-place add to an alias
    return torch.add(ghost, residual, alpha=alpha).to(ghost.dtype)


# op name -> its ATen composition (same arguments as the op's schema).
COMPOSITIONS = {
    "ghost_module": _ghost_module,
    "ghost_module_gated": _ghost_module_gated,
    "ghost_module_depthwise": _ghost_module_depthwise,
    "ghost_module_scaled": _ghost_module_scaled,
    "ghost_module_residual": _ghost_module_residual,
    "squeeze_excite_gate": squeeze_excite._gate_composed,
    "direct_conv2d": direct_conv._fallback,
    "pointwise_conv2d": modules._pointwise_composed,
    "pointwise_conv2d_pool": pointwise_pool._composed,
    "cheap_mix": _cheap_mix.cheap_mix_reference,
    "dfc_logits": dfc_attention.composed,
}


def composed(op, *args):
    """op(*args) as its ATen composition (op: a torch.ops.ghostkernels OpOverload or packet)."""
    return COMPOSITIONS[op.__name__.split(".")[0]](*args)


# -- dynamo=True: the compositions as decompositions -------------------------------------

def _decomposition(name):
    composition = COMPOSITIONS[name]
    layout = {"direct_conv2d": conv_output_format, "pointwise_conv2d": conv_output_format,
              "squeeze_excite_gate": lambda x: torch.contiguous_format,
              "dfc_logits": lambda x: torch.contiguous_format}.get(name, output_memory_format)

    def decomposition(*args, **kwargs):
        return composition(*args, **kwargs).contiguous(memory_format=layout(args[0]))

    decomposition.__name__ = f"ghostkernels_{name}_decomposition"
    return decomposition


def decompositions():
    """{op overload: its ATen composition} for every ghostkernels op, as
    ExportedProgram.run_decompositions takes it: a program whose graph holds the ops themselves
    (they were called directly, or torch.export ran outside torch.onnx.export) then exports to
    ONNX with dynamo=True. The output keeps the op's memory format (the fake kernel's)."""
    return {getattr(torch.ops.ghostkernels, name).default: _decomposition(name) for name in COMPOSITIONS}


# -- dynamo=False: TorchScript symbolic functions ----------------------------------------
#
# Only a model that calls torch.ops.ghostkernels.* itself reaches these: the library's own
# modules and functions already run the compositions while exporting.

SYMBOLIC_OPSET = 11  # Resize with coordinate_transformation_mode, Slice with inputs


def _size(value, dim, what):
    """value's static size in dim (weights, and x's channels: batch and spatial sizes may be dynamic)."""
    from torch.onnx import symbolic_helper
    sizes = symbolic_helper._get_tensor_sizes(value)
    if sizes is None or sizes[dim] is None:
        raise RuntimeError(f"ghostkernels ONNX export (dynamo=False): dimension {dim} of {what} must be static")
    return sizes[dim]


def _const(g, values, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


def _conv(g, x, weight, bias, stride, groups):
    from torch.onnx import symbolic_helper
    k = _size(weight, -1, "a weight")
    inputs = [x, weight] if symbolic_helper._is_none(bias) else [x, weight, bias]
    return g.op("Conv", *inputs, strides_i=[stride, stride], pads_i=[k // 2] * 4, dilations_i=[1, 1],
                group_i=groups, kernel_shape_i=[k, k])


def _act(g, x, activation):
    return g.op("Relu", x) if activation == "relu" else x


def _ghost(g, x, w1, b1, w2, b2, out_channels, stride, activation):
    init, ghosts = _size(w1, 0, "primary_weight"), _size(w2, 0, "cheap_weight")
    x1 = _act(g, _conv(g, x, w1, b1, stride, 1), activation)
    x2 = _act(g, _conv(g, x1, w2, b2, 1, init), activation)
    out = g.op("Concat", x1, x2, axis_i=1)
    if out_channels < init + ghosts:
        out = g.op("Slice", out, _const(g, [0]), _const(g, [out_channels]), _const(g, [1]))
    return out


def _symbolics():
    from torch.onnx import symbolic_helper as h

    @h.parse_args("v", "v", "v", "v", "v", "i", "i", "s")
    def ghost_module(g, x, w1, b1, w2, b2, out_channels, stride, activation):
        return _ghost(g, x, w1, b1, w2, b2, out_channels, stride, activation)

    @h.parse_args("v", "v", "v", "v", "v", "v", "i", "i", "s")
    def ghost_module_gated(g, x, w1, b1, w2, b2, gate, out_channels, stride, activation):
        out = _ghost(g, x, w1, b1, w2, b2, out_channels, stride, activation)
        empty = _const(g, [], torch.float32)
        # PyTorch's 'nearest': source index floor(dst * in / out).
        up = g.op("Resize", g.op("Sigmoid", gate), empty, empty, g.op("Shape", out), mode_s="nearest",
                  coordinate_transformation_mode_s="asymmetric", nearest_mode_s="floor")
        return g.op("Mul", out, up)

    @h.parse_args("v", "v", "v", "v", "v", "i", "i", "s", "v", "v", "i")
    def ghost_module_depthwise(g, x, w1, b1, w2, b2, out_channels, stride, activation, dw, db, dw_stride):
        out = _ghost(g, x, w1, b1, w2, b2, out_channels, stride, activation)
        return _conv(g, out, dw, db, dw_stride, out_channels // _size(dw, 1, "depthwise_weight"))

    @h.parse_args("v", "v", "v", "v", "v", "v", "i", "i", "s")
    def ghost_module_scaled(g, x, scale, w1, b1, w2, b2, out_channels, stride, activation):
        return _ghost(g, g.op("Mul", x, scale), w1, b1, w2, b2, out_channels, stride, activation)

    @h.parse_args("v", "v", "v", "v", "v", "v", "i", "i", "s", "v", "f")
    def ghost_module_residual(g, x, scale, w1, b1, w2, b2, out_channels, stride, activation, residual, alpha):
        if alpha != 1:  # freeze() makes the op of `x += residual`, alpha 1
            raise RuntimeError(f"ghostkernels ONNX export (dynamo=False): ghost_module_residual with alpha {alpha}; "
                               "only alpha 1 is exported")
        x = x if h._is_none(scale) else g.op("Mul", x, scale)
        return g.op("Add", _ghost(g, x, w1, b1, w2, b2, out_channels, stride, activation), residual)

    @h.parse_args("v", "v", "v", "v", "v")
    def squeeze_excite_gate(g, x, rw, rb, ew, eb):
        hidden = g.op("Relu", _conv(g, g.op("GlobalAveragePool", x), rw, rb, 1, 1))
        return g.op("HardSigmoid", _conv(g, hidden, ew, eb, 1, 1), alpha_f=1.0 / 6, beta_f=0.5)

    @h.parse_args("v", "v", "v", "i", "s", "v")
    def direct_conv2d(g, x, weight, bias, stride, activation, groups):
        groups = (_size(x, 1, "x") // _size(weight, 1, "weight") if h._is_none(groups)
                  else h._get_const(groups, "i", "groups"))
        out = _conv(g, x, weight, bias, stride, groups)
        return g.op("Relu", out) if activation == "relu" else out

    @h.parse_args("v", "v", "v", "i", "s", "v")
    def pointwise_conv2d(g, x, weight, bias, stride, activation, residual):
        out = _conv(g, x, weight, bias, stride, 1)
        return _act(g, out if h._is_none(residual) else g.op("Add", out, residual), activation)

    @h.parse_args("v", "v", "v", "s")
    def pointwise_conv2d_pool(g, x, weight, bias, activation):
        out = _conv(g, x, weight, bias, 1, 1)
        return g.op("GlobalAveragePool", g.op("Relu", out) if activation == "relu" else out)

    @h.parse_args("v", "v", "v", "v", "i")
    def cheap_mix(g, x, weight, bias, mix, channel_offset):
        cin = _size(weight, 1, "weight")
        xs = g.op("Slice", x, _const(g, [channel_offset]), _const(g, [channel_offset + cin]), _const(g, [1]))
        mix = g.op("Reshape", mix, _const(g, [0, -1, 1, 1]))
        return g.op("Relu", g.op("Add", _conv(g, xs, weight, bias, 1, 1), mix))

    @h.parse_args("v", "v", "v", "v", "v", "v", "v", "i")
    def dfc_logits(g, x, weight, bias, horizontal_weight, horizontal_bias, vertical_weight, vertical_bias, stride):
        channels = _size(weight, 0, "weight")
        out = _conv(g, g.op("AveragePool", x, kernel_shape_i=[2, 2], strides_i=[2, 2]), weight, bias, stride, 1)
        kw, kh = _size(horizontal_weight, 3, "horizontal_weight"), _size(vertical_weight, 2, "vertical_weight")
        for w, b, shape in ((horizontal_weight, horizontal_bias, [1, kw]), (vertical_weight, vertical_bias, [kh, 1])):
            inputs = [out, w] if h._is_none(b) else [out, w, b]
            out = g.op("Conv", *inputs, strides_i=[1, 1], pads_i=[k // 2 for k in shape] * 2, dilations_i=[1, 1],
                       group_i=channels, kernel_shape_i=shape)
        return out

    return {f.__name__: f for f in (ghost_module, ghost_module_gated, ghost_module_depthwise, ghost_module_scaled,
                                    ghost_module_residual, squeeze_excite_gate, direct_conv2d, pointwise_conv2d,
                                    pointwise_conv2d_pool, cheap_mix, dfc_logits)}


SYMBOLICS = _symbolics()
for _name, _symbolic in SYMBOLICS.items():
    torch.onnx.register_custom_op_symbolic(f"ghostkernels::{_name}", _symbolic, SYMBOLIC_OPSET)
