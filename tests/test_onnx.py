"""ONNX export (both exporters) of every ghostkernels op and of the accelerated zoo models,
run with ONNX Runtime and compared to PyTorch (float32, <= 1e-5 relative)."""

import functools
import inspect
import warnings

import onnx  # the test extra installs onnx, onnxscript (dynamo=True) and onnxruntime: no skip hides them
import onnxruntime as ort
import pytest
import torch
from conftest import TORCH_RELEASE, randomise_bn

import ghostkernels
from ghostkernels import accelerate, models, ops
from ghostkernels.models import ghostnet_050
from ghostkernels.onnx_export import decompositions

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def export_and_run(model, inputs, path, dynamo, grad=True, **export_options):
    """Export model to path (with autograd enabled or not: the inference fast paths of G-Ghost
    stages run without), run it in ONNX Runtime (CPU), return (onnx outputs, torch outputs). With
    dynamo=True on a torch whose exporter does not flag its capture (torch 2.6, 2.7), a model is
    decomposed first, as the README says to there."""
    if dynamo and not ops.DYNAMO_ONNX_EXPORT_IS_FLAGGED and not isinstance(model, torch.export.ExportedProgram):
        with torch.set_grad_enabled(grad):
            model = decomposed(model, inputs)
    with torch.no_grad():
        expected = model.module()(*inputs) if isinstance(model, torch.export.ExportedProgram) else model(*inputs)
    with warnings.catch_warnings(), torch.set_grad_enabled(grad):
        warnings.simplefilter("ignore")
        if dynamo is None:  # torch.onnx.export's defaults, as a user calls it
            torch.onnx.export(model, inputs, str(path), **export_options)
        else:
            options = {"opset_version": 18, "verbose": False, **export_options}
            torch.onnx.export(model, inputs, str(path), dynamo=dynamo, **options)
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node} | {f.domain for f in onnx.load(str(path)).functions}
    assert not any("ghostkernels" in d for d in domains), domains
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0], expected


def assert_close(got, expected):
    expected = expected.detach().numpy()
    assert got.shape == expected.shape
    scale = abs(expected).max()
    error = abs(got - expected).max() / scale
    assert error <= 1e-5, f"relative error {error:.3g}"


class Call(torch.nn.Module):
    """torch.ops.ghostkernels.<name>(x, *tensors, *constants): an op called directly, not
    through the library's modules."""

    def __init__(self, op, tensors, arguments):
        super().__init__()
        self.op, self.arguments = op, arguments
        self.tensors = torch.nn.ParameterList([torch.nn.Parameter(t) if t is not None else None for t in tensors])
        self.layout = [t is not None for t in tensors]

    def forward(self, x, *more):
        tensors = [p if present else None for p, present in zip(self.tensors, self.layout)]
        return self.op(x, *more, *tensors, *self.arguments) if not callable(self.arguments) else \
            self.arguments(self.op, x, *more, *tensors)


def _ghost_weights(inp=8, oup=12, ratio=2, dw=3, kernel=1, bias=True):
    init = ghostkernels.ops.intrinsic_channels(oup, ratio)
    return [torch.randn(init, inp, kernel, kernel) / (inp * kernel * kernel) ** 0.5,
            torch.randn(init) if bias else None,
            torch.randn(init * (ratio - 1), 1, dw, dw) / dw,
            torch.randn(init * (ratio - 1)) if bias else None]


def _op_cases():
    ops = torch.ops.ghostkernels
    x = torch.randn(2, 8, 12, 12)
    cases = {
        "ghost_module": (Call(ops.ghost_module, _ghost_weights(), (12, 1, "relu")), (x,)),
        "ghost_module_k3_s2_odd_none": (
            Call(ops.ghost_module, _ghost_weights(oup=11, ratio=3, kernel=3, bias=False), (11, 2, "none")), (x,)),
        "ghost_module_gated": (
            Call(ops.ghost_module_gated, _ghost_weights(),
                 lambda op, x, gate, w1, b1, w2, b2: op(x, w1, b1, w2, b2, gate, 12, 1, "relu")),
            (x, torch.randn(2, 12, 6, 6))),
        "ghost_module_depthwise": (
            Call(ops.ghost_module_depthwise, _ghost_weights() + [torch.randn(12, 1, 3, 3), torch.randn(12)],
                 lambda op, x, w1, b1, w2, b2, dw, db: op(x, w1, b1, w2, b2, 12, 1, "relu", dw, db, 2)), (x,)),
        "ghost_module_scaled": (
            Call(ops.ghost_module_scaled, _ghost_weights(),
                 lambda op, x, scale, w1, b1, w2, b2: op(x, scale, w1, b1, w2, b2, 12, 1, "relu")),
            (x, torch.rand(2, 8, 1, 1))),
        "ghost_module_residual": (
            Call(ops.ghost_module_residual, _ghost_weights(),
                 lambda op, x, scale, residual, w1, b1, w2, b2: op(x, scale, w1, b1, w2, b2, 12, 1, "relu", residual)),
            (x, torch.rand(2, 8, 1, 1), torch.randn(2, 12, 12, 12))),
        "squeeze_excite_gate": (
            Call(ops.squeeze_excite_gate, [torch.randn(4, 8, 1, 1), torch.randn(4), torch.randn(8, 4, 1, 1),
                                           torch.randn(8)], ()), (x,)),
        "direct_conv2d_depthwise_s2": (Call(ops.direct_conv2d, [torch.randn(8, 1, 5, 5), torch.randn(8)], (2,)), (x,)),
        "direct_conv2d_stem": (Call(ops.direct_conv2d, [torch.randn(16, 8, 3, 3), None], (1,)), (x,)),
        "direct_conv2d_stem_relu": (Call(ops.direct_conv2d, [torch.randn(16, 8, 3, 3), torch.randn(16)], (2, "relu")),
                                    (x,)),
        "pointwise_conv2d": (Call(ops.pointwise_conv2d, [torch.randn(6, 8, 1, 1), torch.randn(6)], ()), (x,)),
        "pointwise_conv2d_s2_residual_relu": (
            Call(ops.pointwise_conv2d, [torch.randn(6, 8, 1, 1), torch.randn(6)],
                 lambda op, x, residual, w, b: op(x, w, b, 2, "relu", residual)), (x, torch.randn(2, 6, 6, 6))),
        "pointwise_conv2d_pool": (
            Call(ops.pointwise_conv2d_pool, [torch.randn(6, 8, 1, 1), torch.randn(6)], ("relu",)), (x,)),
        "dfc_logits": (Call(ops.dfc_logits, [torch.randn(6, 8, 1, 1), torch.randn(6), torch.randn(6, 1, 1, 5), None,
                                             torch.randn(6, 1, 5, 1), torch.randn(6)], (1,)), (x,)),
        "cheap_mix": (Call(ops.cheap_mix, [torch.randn(5, 3, 1, 1), torch.randn(5)],
                           lambda op, x, mix, w, b: op(x, w, b, mix, 4)), (x, torch.randn(2, 5))),
    }
    return cases


OP_CASES = _op_cases()


def decomposed(model, inputs, **export_options):
    """model's torch.export program with every ghostkernels op replaced by its composition: how
    a model that calls torch.ops.ghostkernels.* itself exports with dynamo=True (README)."""
    return torch.export.export(model, inputs, **export_options).run_decompositions(decompositions())


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_called_directly(case, dynamo, tmp_path):
    model, inputs = OP_CASES[case]
    model.eval()
    got, _ = export_and_run(decomposed(model, inputs) if dynamo else model, inputs, tmp_path / "op.onnx", dynamo)
    with torch.no_grad():
        assert_close(got, model(*inputs))


def test_no_global_decompositions():
    """Inductor refuses to compile an op that has a global decomposition as a fallback kernel when
    the environment sets CI (GitHub Actions does): the library registers none."""
    assert not [op for op in torch._decomp.decomposition_table if "ghostkernels" in str(op)]


class Functional(torch.nn.Module):
    """The library's functional API: ghostkernels.ghost_module (plain and gated) and cheap_mix."""

    def __init__(self):
        super().__init__()
        self.weights = torch.nn.ParameterList(_ghost_weights())
        self.mix_weight = torch.nn.Parameter(torch.randn(4, 6, 1, 1))

    def forward(self, x, gate, mix):
        w1, b1, w2, b2 = self.weights
        y = ghostkernels.ghost_module(x, w1, b1, w2, b2, out_channels=12, gate=gate)
        return ghostkernels.cheap_mix.cheap_mix(y, self.mix_weight, None, mix, channel_offset=3)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_functional_api(dynamo, tmp_path):
    inputs = (torch.randn(2, 8, 10, 10), torch.randn(2, 12, 5, 5), torch.randn(2, 4))
    assert_close(*export_and_run(Functional().eval(), inputs, tmp_path / "f.onnx", dynamo))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_ghost_module(dynamo, tmp_path):
    module = ghostkernels.GhostModule(16, 24, kernel_size=3, ratio=3, dw_size=5, stride=2)
    randomise_bn(module)
    inputs = (torch.randn(2, 16, 15, 15),)
    assert_close(*export_and_run(module.eval(), inputs, tmp_path / "m.onnx", dynamo))


def _accelerated(model):
    # The self-check is accelerate's own business (tested elsewhere); here the ONNX model is
    # compared to the accelerated PyTorch model itself.
    randomise_bn(model, 0.1)
    return accelerate(model.eval(), check=False)


# Together they run every op: ghost_module (zoo GhostNet, V2's plain modules), ghost_module_gated
# and dfc_logits (V2's DFC modules), ghost_module_depthwise, ghost_module_scaled, squeeze_excite_gate,
# direct_conv2d and pointwise_conv2d (accelerated GhostNets), cheap_mix (G-Ghost stages).
MODELS = {
    "accelerated_ghostnet_050": lambda: _accelerated(ghostnet_050(fused=False)),
    "zoo_ghostnet_100": lambda: models.ghostnet_100().eval(),
    "accelerated_ghostnetv2_100": lambda: _accelerated(models.ghostnetv2_100(fused=False)),
    "accelerated_g_ghost_regnetx_002": lambda: _accelerated(models.g_ghost_regnetx("002", fused=False)),
}


@functools.lru_cache(maxsize=None)
def _model(name):
    torch.manual_seed(0)
    return MODELS[name]()


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model(name, dynamo, tmp_path):
    model = _model(name)
    inputs = (torch.randn(1, 3, 64, 64),)
    assert_close(*export_and_run(model, inputs, tmp_path / "model.onnx", dynamo, grad=False))


def test_dynamo_export_flag_is_read_where_torch_sets_it():
    """From torch 2.8 on the dynamo=True exporter flags its capture (torch 2.6 and 2.7 do not): there the
    library must read the flag, or export_and_run would quietly decompose first and hide that a
    plain torch.onnx.export(model, dynamo=True) no longer works (a torch that moved the flag)."""
    assert ops.DYNAMO_ONNX_EXPORT_IS_FLAGGED == (TORCH_RELEASE >= (2, 8)), torch.__version__


@pytest.mark.parametrize("dynamo", [None, *EXPORTERS])
def test_default_options(dynamo, tmp_path):
    """torch.onnx.export(model, args, f) with the exporter's own defaults (opset included), on a
    model that calls an op directly and one of the library's modules."""
    module = ghostkernels.GhostModule(8, 12)
    randomise_bn(module)
    direct = Call(torch.ops.ghostkernels.direct_conv2d, [torch.randn(12, 1, 3, 3), torch.randn(12)], (2,))
    model, inputs = torch.nn.Sequential(module, direct).eval(), (torch.randn(2, 8, 12, 12),)
    default_dynamo = inspect.signature(torch.onnx.export).parameters["dynamo"].default  # True from torch 2.9
    torchscript = dynamo is False or (dynamo is None and not default_dynamo)
    got, _ = export_and_run(model if torchscript else decomposed(model, inputs), inputs, tmp_path / "d.onnx", dynamo)
    with torch.no_grad():
        assert_close(got, model(*inputs))


@pytest.mark.parametrize("name", ["accelerated_ghostnetv2_100", "accelerated_g_ghost_regnetx_002"])
def test_exported_program(name, tmp_path):
    """A torch.export program (made outside the ONNX exporter: it holds the ghostkernels ops,
    every one but cheap_mix_into between these two models), decomposed, given to torch.onnx.export."""
    model, x = _model(name), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    used = {str(node.target) for node in program.graph.nodes if "ghostkernels" in str(node.target)}
    assert used, "the program holds no ghostkernels op"
    program = program.run_decompositions(decompositions())
    got, _ = export_and_run(program, (x,), tmp_path / "p.onnx", True, grad=False)
    with torch.no_grad():
        assert_close(got, model(x))


class DirectAndModule(torch.nn.Module):
    """Ops called directly (direct_conv2d, ghost_module) and a GhostModule, for dynamic shapes."""

    def __init__(self):
        super().__init__()
        self.depthwise = torch.nn.Parameter(torch.randn(8, 1, 3, 3))
        self.weights = torch.nn.ParameterList(_ghost_weights())
        self.module = ghostkernels.GhostModule(8, 12)
        randomise_bn(self.module)

    def forward(self, x):
        y = torch.ops.ghostkernels.direct_conv2d(x, self.depthwise, None, 2)
        w1, b1, w2, b2 = self.weights
        return torch.ops.ghostkernels.ghost_module(y, w1, b1, w2, b2, 12, 1, "relu") + self.module(y)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_shapes(dynamo, tmp_path):
    """Batch and spatial sizes dynamic: the model exported at one size runs at another."""
    model, path, inputs = DirectAndModule().eval(), tmp_path / "dyn.onnx", (torch.randn(2, 8, 16, 16),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("n", max=64), 2: torch.export.Dim("h", min=4, max=256),
                    3: torch.export.Dim("w", min=4, max=256)}
            torch.onnx.export(decomposed(model, inputs, dynamic_shapes=(dims,)), inputs, str(path), dynamo=True,
                              input_names=["x"], opset_version=18)
        else:
            torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=["x"], opset_version=18,
                              dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    x = torch.randn(3, 8, 21, 26)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert_close(got, model(x))
