"""accelerate() and freeze() of the installed timm's GhostNets against timm itself, and the test suite's
timm stand-in (tests/timm_ghostnet.py) against the installed timm.

    python bench/timm_parity.py [--models ghostnet_100 ghostnetv2_100 ...]

The tests cannot import timm on CI's machine kind (timm needs torchvision, which has no CPU build beside
torch 2.13), so they run on tests/timm_ghostnet.py, written after timm's source. This checks the
library and the stand-in against the real package wherever it imports: the GPU image, or on an x86-64
machine of CI's kind a virtualenv with

    pip install torch==2.14.1 torchvision==0.29.1 timm    # CUDA builds from this kind's disk; they run on the CPU

and this repository built into it from a clone (`pip install --no-build-isolation -e .` there: an
in-place build would replace the checkout's libraries with ones for another torch).

Per model, on the CPU (random weights, the BatchNorms' statistics and affine parameters randomised;
GhostNetV3 as built and after `timm.utils.reparameterize_model`): eval in float32 against timm
(NCHW and channels_last inputs, an odd input size, freeze()) within 4x eager float32's own error
(against float64) and at least 1e-5, and float64 to 1e-10; training mode in float64 (output, input
and parameter gradients, running statistics: training_checks); features_only; and the stand-in of the same
version and width: its state-dict keys and shapes and its module classes in order, and its forward
on the real model's weights. Prints a line per check; exits 1 if one fails.
"""

import argparse
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import timm_ghostnet  # noqa: E402
from conftest import randomise_bn  # noqa: E402

from ghostkernels import accelerate, freeze  # noqa: E402
from ghostkernels.acceleration import _relative_error  # noqa: E402


def eval_checks(model, x):
    """(what, error, limit) of accelerate() and freeze() of an eval-mode `model` on x."""
    with torch.no_grad():
        expected = model(x)
        own = _relative_error(expected, copy.deepcopy(model).double()(x.double()).float())  # eager float32's own error
        limit = max(1e-5, 4 * own)
        fast = accelerate(model, example_inputs=x)  # its self-check on x
        odd = x[:1, :, :x.shape[2] - 31, :x.shape[3] - 5]
        checks = [("accelerated float32", _relative_error(fast(x), expected), limit),
                  ("accelerated float32, channels_last input",
                   _relative_error(fast(x.contiguous(memory_format=torch.channels_last)), expected), limit),
                  (f"accelerated float32, {tuple(odd.shape)}", _relative_error(fast(odd), model(odd)), limit),
                  ("frozen float32", _relative_error(freeze(fast, x)(x), expected), limit)]
        model64, x64 = copy.deepcopy(model).double(), x.double()
        fast64 = accelerate(model64, example_inputs=x64)
        checks.append(("accelerated float64", _relative_error(fast64(x64), model64(x64)), 1e-10))
    return checks


def _training_step(network, x):
    """(output, x's gradient, {name: parameter gradient}, {name: floating buffer}) of one
    training-mode forward of `network` on x and a backward of the output's squares."""
    x = x.clone().requires_grad_()
    out = network(x)
    out.square().sum().backward()
    return (out.detach(), x.grad, {name: p.grad for name, p in network.named_parameters() if p.grad is not None},
            {name: b for name, b in network.named_buffers() if b.is_floating_point()})


def _step_differences(step, reference):
    """Relative differences of two _training_step results: output, x's gradient, parameter gradients
    (the largest difference over the largest gradient: a BN's bias before a training-mode BN has a
    gradient of exactly 0 in math, rounding noise on both sides; inf where one is missing), running
    statistics."""
    (out, grad, params, buffers), (out0, grad0, params0, buffers0) = step, reference
    scale = max(g.abs().max().item() for g in params0.values())
    params_error = (max((params[n] - g).abs().max().item() for n, g in params0.items()) / scale
                    if params.keys() == params0.keys() else float("inf"))
    return [_relative_error(out, out0), _relative_error(grad, grad0), params_error,
            max(_relative_error(buffers[n], b) for n, b in buffers0.items())]


def training_checks(model, x):
    """(what, error, limit) of one training-mode step of accelerate(model) against model's, float64,
    to 1e-9: the output, x's gradient, the parameters' gradients and the BNs' running statistics.
    x wants planes of several values a channel at the last stage: at 96x96 (3x3 there, batch 2),
    nudging x by 1e-15 relative moved eager GhostNetV3 1.3x's own gradients by 0.6-2.3e-9."""
    x = x.double()
    original = copy.deepcopy(model).double().train()
    with warnings.catch_warnings():  # that a training-mode model gets only its training swaps
        warnings.simplefilter("ignore")
        ours = accelerate(copy.deepcopy(original), example_inputs=x)
    errors = _step_differences(_training_step(ours, x), _training_step(original, x))
    names = ("output", "x gradient", "parameter gradients", "running statistics")
    return [(f"training float64 {name}", error, 1e-9) for name, error in zip(names, errors)]


def stand_in_checks(real, stand_in, x):
    """(what, error, limit) of the stand-in against the real model: state-dict keys and shapes and
    module classes in order (0 or 1), and its forward on the real model's weights."""
    real_state, state = real.state_dict(), stand_in.state_dict()
    same_keys = list(real_state) == list(state) and all(real_state[k].shape == state[k].shape for k in state)
    same_classes = [type(m).__name__ for m in real.modules()] == [type(m).__name__ for m in stand_in.modules()]
    checks = [("stand-in state-dict keys and shapes differ", float(not same_keys), 0.0),
              ("stand-in module classes differ", float(not same_classes), 0.0)]
    if same_keys:
        stand_in.load_state_dict(real_state)
        with torch.no_grad():
            error = _relative_error(stand_in.eval()(x), real.eval()(x))
            checks.append(("stand-in forward on the real weights", error, 1e-6))
    return checks


def model_checks(timm, name, x):
    """Every check of one timm model name: [(label, [(what, error, limit), ...]), ...]."""
    version = "v3" if "v3" in name else "v2" if "v2" in name else "v1"
    width = int(name[-3:]) / 100
    forms = ("multi-branch", "reparameterized") if version == "v3" else ("",)
    report = []
    for form in forms:
        torch.manual_seed(0)
        model = randomise_bn(timm.create_model(name, pretrained=False, drop_rate=0.0), spread=0.2).eval()
        if form == "reparameterized":
            from timm.utils import reparameterize_model
            model = reparameterize_model(model)
        checks = eval_checks(model, x)
        if form != "reparameterized":  # timm's re-parameterised V3 is for inference
            checks += training_checks(model, x[:2, :, :160, :160])
        if form != "multi-branch":  # the stand-in is V3 re-parameterised
            stand_in = timm_ghostnet.GhostNet(timm_ghostnet.CFGS, width=width, version=version, drop_rate=0.0)
            checks += stand_in_checks(model, stand_in, x)
        report.append((f"{name} {form}".strip(), checks))
    torch.manual_seed(0)
    features = randomise_bn(timm.create_model(name, pretrained=False, features_only=True), spread=0.2).eval()
    with torch.no_grad():
        error = _relative_error(accelerate(features, example_inputs=x)(x), features(x))
    report.append((f"{name} features_only", [("accelerated float32", error, 1e-5)]))
    return report


def main():
    import timm
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=timm.list_models("ghostnet*"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"timm {timm.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    failed = 0
    for name in args.models:
        torch.manual_seed(1)
        for label, checks in model_checks(timm, name, torch.randn(2, 3, 224, 224)):
            print(label)
            for what, error, limit in checks:
                ok = error <= limit
                failed += not ok
                print(f"  {what}: {error:.2e} (limit {limit:.0e}) {'ok' if ok else 'FAILED'}")
    print(f"{failed} checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
