"""ghostkernels.freeze(): the accelerated forward traced into a frozen TorchScript graph gives the
model's outputs on other batch sizes, resolutions and memory formats, keeps its weights as they
were, and refuses what it cannot trace faithfully."""

import copy
import gc
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch import nn

import ghostkernels
from ghostkernels import models

from conftest import intra_op_threads, randomise_bn
from huawei_ghostnet import huawei_ghostnet
from timm_ghostnet import timm_ghostnet

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "zoo-v1-0.5x": lambda: models.ghostnet_050(fused=False),
    "zoo-v2-0.5x": lambda: models.ghostnetv2(width=0.5),
    "zoo-v3-0.5x": lambda: models.ghostnetv3_050(),
    "timm-v1": lambda: timm_ghostnet("v1", width=0.5),
    "huawei-v2": lambda: huawei_ghostnet("v2", width=0.5),
}


def frozen_pair(name, example):
    model = ghostkernels.accelerate(randomise_bn(MODELS[name](), spread=0.2).eval())
    return model, ghostkernels.freeze(model, example)


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# threads: the frozen graph's kernels split over 1 to 3 intra-op threads (the module's default is 1)
@pytest.mark.parametrize("name, threads", zip(MODELS, (1, 2, 3, 1, 2)))
def test_frozen_model_gives_the_models_outputs(name, threads):
    model, frozen = frozen_pair(name, torch.randn(1, 3, 64, 64))
    with torch.no_grad(), intra_op_threads(threads):
        for x in (torch.randn(1, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.randn(2, 3, 96, 80),
                  torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)):
            assert_same(frozen(x), model(x))


def test_frozen_model_keeps_the_weights_it_was_frozen_with():
    model, frozen = frozen_pair("zoo-v1-0.5x", torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        for p in model.parameters():
            p.mul_(0.5)
        after = model(x)
        assert not torch.allclose(after, before)
        assert_same(frozen(x), before)
        assert_same(ghostkernels.freeze(model, x)(x), after)  # freezing again takes the new weights


@pytest.mark.skipif(ghostkernels.backends()["cpu"]["backend"] != "cpp", reason="counts through the C++ registry")
def test_a_dropped_frozen_model_releases_its_weights():
    """TorchScript keeps every module that torch.jit.freeze makes, with its constants, for the
    life of the process (pytorch/pytorch#96726): each freeze() kept a copy of the weights for
    good. Counted through the registry of frozen weights, which holds them weakly."""
    status = torch.ops.ghostkernels.frozen_weights_status
    gc.collect()
    before = status()[0]
    _, frozen = frozen_pair("zoo-v1-0.5x", torch.randn(1, 3, 64, 64))
    assert status()[0] > before
    del frozen
    gc.collect()
    assert status()[0] == before


class _Square(torch.autograd.Function):  # forward only: the frozen graph runs without autograd
    @staticmethod
    def forward(ctx, x):
        return x * x


def test_a_graph_that_calls_python_still_freezes():
    """A traced autograd.Function is a Python call in the graph, which TorchScript cannot save:
    freeze() keeps such a graph as it was built (and cannot release it) instead of failing."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return _Square.apply(self.conv(x))

    model, x = Model().eval(), torch.randn(1, 3, 16, 16)
    frozen = ghostkernels.freeze(model, x)
    assert "prim::PythonOp" in {node.kind() for node in frozen.graph.graph.nodes()}
    with torch.no_grad():
        y = torch.randn(2, 3, 20, 16)
        assert_same(frozen(y), model(y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_dropped_frozen_model_releases_its_gpu_memory():
    """The same on CUDA, by the caching allocator's live bytes: a second freeze leaves nothing
    behind (the first may leave the libraries' workspaces)."""
    model = ghostkernels.accelerate(models.ghostnet_050(fused=False).eval().cuda())
    x = torch.randn(1, 3, 64, 64, device="cuda")
    ghostkernels.freeze(model, x)
    gc.collect()
    before = torch.cuda.memory_allocated()
    frozen = ghostkernels.freeze(model, x)
    assert torch.cuda.memory_allocated() > before
    del frozen
    gc.collect()
    assert torch.cuda.memory_allocated() == before


def test_op_scopes_name_the_graphs_ops_in_order():
    """The loaded graph keeps no module scopes; op_scopes has the trace's, op for op."""
    _, frozen = frozen_pair("zoo-v1-0.5x", torch.randn(1, 3, 64, 64))
    kinds = [node.kind() for node in frozen.graph.graph.nodes() if not node.kind().startswith("prim::")]
    assert [kind for kind, _ in frozen.op_scopes] == kinds
    assert frozen.op_scopes[0][1] == "conv_stem" and frozen.op_scopes[-1][1] == "classifier"


def test_models_serve_several_python_threads_at_once():
    """A server's worker threads call one accelerated and one frozen model concurrently (the ops
    release the GIL; their scratch buffers are per thread, the output cache locked): every output
    as a single thread's."""
    model, frozen = frozen_pair("zoo-v2-0.5x", torch.randn(1, 3, 64, 64))
    inputs = [torch.randn(batch, 3, side, side) for batch, side in ((1, 64), (2, 80), (3, 64))]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    outputs = {}

    def serve(worker):
        with torch.no_grad():
            for call in range(24):
                i = (worker + call) % len(inputs)
                outputs[worker, call] = i, (model, frozen)[call % 2](inputs[i])

    with intra_op_threads(2):
        workers = [threading.Thread(target=serve, args=(worker,)) for worker in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert len(outputs) == 4 * 24
    for i, out in outputs.values():
        assert_same(out, expected[i])


def test_frozen_model_runs_without_autograd():
    _, frozen = frozen_pair("zoo-v1-0.5x", torch.randn(1, 3, 64, 64))
    assert not frozen(torch.randn(1, 3, 64, 64, requires_grad=True)).requires_grad


def test_frozen_model_saves_and_loads_in_a_new_process(tmp_path):
    """torch.save raised ("does not have a __getstate__ method defined"): the frozen graph is a
    ScriptModule. The new process imports only torch: unpickling imports ghostkernels."""
    model, frozen = frozen_pair("zoo-v1-0.5x", torch.randn(1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    torch.save({"frozen": frozen, "x": x}, tmp_path / "frozen.pt")
    load = ("import sys, torch; saved = torch.load(sys.argv[1], weights_only=False); "
            "torch.save(saved['frozen'](saved['x']), sys.argv[2])")
    subprocess.run([sys.executable, "-c", load, tmp_path / "frozen.pt", tmp_path / "out.pt"], check=True)
    with torch.no_grad():
        expected = model(x)
    assert_same(torch.load(tmp_path / "out.pt"), expected)
    assert_same(copy.deepcopy(frozen)(x), expected)


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning], ids=["torch 2.13", "torch 2.14"])
def test_pickling_a_frozen_model_keeps_torch_jits_deprecation_notices_to_itself(monkeypatch, category):
    """torch.jit.save and torch.jit.load, which pickling a frozen model calls, warn that torch.jit is
    deprecated: a DeprecationWarning in torch 2.13, a FutureWarning (which Python shows users) from
    2.14 on. freeze() chose torch.jit; its users get no notice of it, as freeze() itself gives none."""
    _, frozen = frozen_pair("zoo-v1-0.5x", torch.randn(1, 3, 32, 32))
    for name in ("save", "load"):
        def warn_then_call(*args, _call=getattr(torch.jit, name), _name=name, **kwargs):
            warnings.warn(f"`torch.jit.{_name}` is deprecated. Please switch to `torch.export`.", category)
            return _call(*args, **kwargs)
        monkeypatch.setattr(torch.jit, name, warn_then_call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(frozen))


def test_frozen_model_names_a_wrong_argument():
    _, frozen = frozen_pair("zoo-v1-0.5x", torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match=r"argument 0 is torch.float64 on cpu; the model was frozen for torch.float32"):
        frozen(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected 1 positional arguments, got 2"):
        frozen(torch.randn(1, 3, 64, 64), torch.randn(1))
    with pytest.raises(TypeError, match="argument 0 must be a tensor, got list"):
        frozen([1.0])


def test_freeze_rejects_what_it_cannot_trace_faithfully():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ghostkernels.freeze(lambda x: x, torch.randn(1))
    with pytest.raises(ValueError, match="training mode"):
        ghostkernels.freeze(nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a non-empty tuple of tensors"):
        ghostkernels.freeze(nn.Linear(2, 2).eval(), [torch.randn(1, 2)])

    class ValueBranch(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(RuntimeError, match="takes a Python branch on its inputs' values or shapes"):
        ghostkernels.freeze(ValueBranch().eval(), torch.ones(1, 2))

    class Counter(nn.Module):  # Python state that the trace keeps without a warning
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    with pytest.raises(RuntimeError, match="gives outputs that differ by .* on random inputs"):
        ghostkernels.freeze(Counter().eval(), torch.ones(1, 2))


def test_freeze_warns_that_hooks_run_during_the_trace_only():
    """A hook that records tensors (feature capture) records nothing from the frozen graph: said once,
    naming where; an editing hook's effect is in the graph, as the trace saw it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ghostkernels.freeze(model, x)
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.warns(UserWarning, match=r"freeze: hooks on 1 module\(s\) \(0\) run while it traces the forward only"):
        frozen = ghostkernels.freeze(model, x)
    with torch.no_grad():
        assert_same(frozen(x), model(x))


def test_torch_jit_script_says_what_keeps_the_fused_kernels():
    """torch.jit.script stopped on some line of the library ("Expected a single top-level
    function: .../ops.py:436", or a zoo block's attribute that only stride-2 blocks have); the
    library's modules and models now refuse by name before anything compiles."""
    model, frozen = frozen_pair("timm-v1", torch.randn(1, 3, 64, 64))
    trace_hint = r"torch.jit.trace\(model, example\), ghostkernels.freeze\(model, example\)"
    for scripted, name in ((model, r"\w+"), (ghostkernels.GhostModule(16, 32), "GhostModule"),
                           (models.ghostnet_050(fused=False), "GhostNet"), (models.ghostnetv3_050(), "GhostNet"),
                           # a 2x2 conv stays an nn.Conv2d when folded: the folded BN's place is what refuses
                           (ghostkernels.accelerate(nn.Sequential(nn.Conv2d(3, 8, 2), nn.BatchNorm2d(8)).eval()),
                            "FoldedBatchNorm")):
        with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile ghostkernels' {name}: .*{trace_hint}"):
            torch.jit.script(scripted)
    with pytest.raises(RuntimeError, match=r"compile ghostkernels' FrozenModel: it holds a TorchScript graph already: torch.save\(model"):
        torch.jit.script(frozen)


def test_frozen_model_returns_tuples_of_several_inputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = models.ghostnet_050(fused=False, num_classes=10)

        def forward(self, x, scale):
            y = self.body(x)
            return y * scale, y.softmax(-1)

    model = ghostkernels.accelerate(TwoHeads().eval())
    example = (torch.randn(1, 3, 64, 64), torch.randn(1, 1))
    frozen = ghostkernels.freeze(model, example)
    with torch.no_grad():
        x, scale = torch.randn(2, 3, 64, 64), torch.randn(2, 1)
        for actual, expected in zip(frozen(x, scale), model(x, scale)):
            assert_same(actual, expected)
