"""Training steps (forward, cross-entropy, backward, SGD with momentum): the original model run
eagerly vs ghostkernels.accelerate (its Ghost modules on ghost_module_train, batch-statistics BN
fused) vs torch.compile of the original model, interleaved in one process.

    OPENBLAS_NUM_THREADS=1 python bench/train.py       # CPU: GhostNet 1.0x b16 at 224, Ghost-ResNet-56 b64 at 32
    OPENBLAS_NUM_THREADS=1 python bench/train.py --no-compile --models ghost-resnet-56
    python bench/train.py --device cuda                # GPU: AMP float16, GhostNet 1.0x batch 128

Parity first: one backward from the same weights on the same batch, the loss and every gradient
of each contender (eager included) against the model's in float64, relative to the tensor's
largest gradient (at least 1% of the model's largest): float32 training of a deep network is
itself 1e-4 to 1e-2 off, so eager's error is the yardstick (torch.compile draws its own dropout
masks, so its GhostNet error includes another head-dropout mask). Then the contenders step in turn,
five rounds; the table gives the median ms per step. Peak memory: on the CPU, each contender's peak resident memory over three steps in a
fresh process, less its memory before the first step (torch.compile's includes the compiler's);
on CUDA, torch.cuda.max_memory_allocated over three steps.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ghostkernels  # noqa: E402
from cases import interleaved_times_ms  # noqa: E402
from ghostkernels import GhostModule, models  # noqa: E402
from ghostkernels.reference import ReferenceGhostModule  # noqa: E402
from machine import DEFAULT_NOISE, is_noisy, machine_line, row_spread  # noqa: E402

CONTENDERS = ["eager", "accelerated", "compile(eager)"]


def original_ghost_modules(model):
    """`model` with each GhostModule replaced by the original code's module (same weights):
    what a Ghost-ResNet runs without ghostkernels."""
    for name, module in list(model.named_modules()):
        if type(module) is GhostModule:
            conv, cheap = module.primary_conv[0], module.cheap_operation[0]
            original = ReferenceGhostModule(conv.in_channels, module.oup, conv.kernel_size[0],
                                            cheap.out_channels // conv.out_channels + 1, cheap.kernel_size[0],
                                            conv.stride[0], module.activation == "relu")
            original.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, original)
    return model


# name: (the original model, image size, classes, CPU batch, CUDA batch)
MODELS = {
    "ghostnet-1.0": (lambda: models.ghostnet(1.0, fused=False), 224, 1000, 16, 128),
    "ghost-resnet-56": (lambda: original_ghost_modules(ghostkernels.ghostify(models.resnet56_cifar())),
                        32, 10, 64, 256),
}


def contender(name, original):
    """The model contender `name` trains: a copy of `original`."""
    model = copy.deepcopy(original)
    if name == "accelerated":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "training mode, so only its Ghost modules were swapped"
            return ghostkernels.accelerate(model, inplace=True)
    return torch.compile(model) if name.startswith("compile") else model


def trainer(model, x, y, amp):
    """A callable running one training step of `model` on (x, y); returns the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def inputs(model_name, batch, device):
    _, size, classes, _, _ = MODELS[model_name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), generator=generator).to(device)


def gradients(model):
    """{parameter name: its grad in float64}, names as in the original model."""
    return {name.replace("_orig_mod.", ""): p.grad.double() for name, p in model.named_parameters()}


def gradient_error(found, expected):
    """The worst relative error of the grads `found` against `expected`, relative to each tensor's
    largest grad and at least 1% of the model's largest."""
    floor = 1e-2 * max(g.abs().max().item() for g in expected.values())
    return max(((found[n] - g).abs().max() / max(g.abs().max().item(), floor)).item() for n, g in expected.items())


def peak_memory_mb(model_name, name, batch, device, amp):
    """MB of memory three training steps of contender `name` need beyond the model's."""
    if device == "cuda":
        original = MODELS[model_name][0]().to(device).to(memory_format=torch.channels_last)
        step = trainer(contender(name, original), *inputs(model_name, batch, device), amp)
        step()  # compiles, creates the optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-rss-of", model_name, name,
                             str(batch)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["mb"]


def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def print_peak_rss(model_name, name, batch):
    """The --peak-rss-of child: peak resident MB of three steps, less the resident MB before them."""
    torch.set_num_threads(2)
    step = trainer(contender(name, MODELS[model_name][0]()), *inputs(model_name, batch, "cpu"), False)
    before = resident_mb()
    for _ in range(3):
        step()
    print(json.dumps({"mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, help="default: 16 / 64 (CPU), 128 / 256 (CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes to build)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE)
    parser.add_argument("--out", help="also write the table (markdown) here")
    parser.add_argument("--peak-rss-of", nargs=3, metavar=("MODEL", "CONTENDER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_of:
        model_name, name, batch = args.peak_rss_of
        return print_peak_rss(model_name, name, int(batch))
    torch.set_num_threads(args.threads)
    device, cuda = args.device, args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("train.py --device cuda: no CUDA device is visible")
    contenders = CONTENDERS[:2] if args.no_compile else CONTENDERS
    rows = []
    for model_name in args.models:
        build, _, _, cpu_batch, cuda_batch = MODELS[model_name]
        batch = args.batch or (cuda_batch if cuda else cpu_batch)
        torch.manual_seed(0)
        original = build().train().to(device)
        if cuda:
            original = original.to(memory_format=torch.channels_last)
        x, y = inputs(model_name, batch, device)
        torch._dynamo.reset()
        # Parity: one backward from the same weights, no update, against the model in float64.
        exact = copy.deepcopy(original).double()
        torch.manual_seed(0)  # the same dropout masks in every parity forward
        loss = F.cross_entropy(exact(x.double()), y)
        loss.backward()
        expected = loss.item(), gradients(exact)
        del exact
        steps, errors = {}, {}
        for name in contenders:
            model = contender(name, original)
            torch.manual_seed(0)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            errors[name] = (abs(loss.item() - expected[0]) / abs(expected[0]),
                            gradient_error(gradients(model), expected[1]))
            model.zero_grad(set_to_none=True)
            steps[name] = trainer(model, x, y, cuda)
        samples = interleaved_times_ms(steps, rounds=args.rounds, min_time=args.rounds * 1.0, device=device)
        memory = {} if args.no_memory else {n: peak_memory_mb(model_name, n, batch, device, cuda) for n in contenders}
        worst = row_spread(samples)
        rows.append({"model": model_name, "batch": batch, "ms": {n: statistics.median(t) for n, t in samples.items()},
                     "errors": errors, "memory": memory, "spread": worst, "noisy": is_noisy(worst, args.noise)})
    precision = "AMP float16, channels_last" if cuda else "float32"
    header = (f"ghostkernels {ghostkernels.__version__}, torch {torch.__version__}, {device} "
              f"({torch.cuda.get_device_name() if cuda else f'{args.threads} threads'}), {precision}, training step "
              "(forward, cross-entropy, backward, SGD momentum), median ms")
    lines = [f"# Training steps: {header}", ""]
    if not cuda:
        lines += [machine_line(args.threads), ""]
    lines += ["| model | batch | " + " | ".join(f"{n} ms" for n in contenders) + " | eager / accelerated | "
              "compile / accelerated | peak MB (" + " / ".join(contenders) + ") | error vs float64 (loss, grads) | "
              "spread |", "|---" * (len(contenders) + 7) + "|"]
    for r in rows:
        ms = r["ms"]
        compiled = f"{ms['compile(eager)'] / ms['accelerated']:.2f}x" if "compile(eager)" in ms else "-"
        memory = " / ".join(f"{r['memory'][n]:.0f}" for n in contenders) if r["memory"] else "-"
        parity = "; ".join(f"{n} {e[0]:.1e}, {e[1]:.1e}" for n, e in r["errors"].items())
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(f"{ms[n]:.1f}" for n in contenders)
                     + f" | {ms['eager'] / ms['accelerated']:.2f}x | {compiled} | {memory} | {parity} | "
                     f"{r['spread']:.0%}{' noisy' if r['noisy'] else ''} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
