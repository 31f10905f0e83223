"""`python -m ghostkernels`: what this install runs on, and whether its kernels give the reference's
answer here. Prints the versions, the backend of each device and why (`ghostkernels.backends()`),
then runs the fused Ghost op on every device with a kernel against the PyTorch reference on a
few random shapes; exits with status 1 if one disagrees. `--no-check` prints the report only."""

import argparse
import platform
import sys

import torch

import ghostkernels
from ghostkernels import backends, ghost_module, ghost_module_reference
from ghostkernels.acceleration import _relative_error

# (inp, oup, kernel, ratio, dw, stride, activation): odd channel counts, both strides, both activations
SHAPES = [(24, 72, 1, 2, 3, 1, "relu"), (13, 37, 1, 3, 5, 2, "none"), (16, 48, 3, 2, 7, 1, "relu")]
# Relative to the reference on the same rounded inputs, in float64 for float32 and in float32 for
# half precision (whose outputs and intermediate x1 round to it); bench/gpu_report.py's tolerances
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _triton_version():
    # Imported here, not by the package (it imports Triton at the first CUDA call): the version
    # of whichever distribution provides it (triton, pytorch-triton, ...), or why it does not load
    try:
        import triton
    except ImportError as error:
        return f"not importable ({error})"
    return triton.__version__


def report():
    lines = [f"ghostkernels {ghostkernels.__version__} ({ghostkernels.__path__[0]})",
             f"torch {torch.__version__}, triton {_triton_version()}, Python {platform.python_version()}, "
             f"{platform.machine()}",
             f"CPU: {torch.backends.cpu.get_cpu_capability()} capability, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        lines.append(f"CUDA: {torch.cuda.get_device_name()} (capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))}), CUDA {torch.version.cuda}")
    for device, status in backends().items():
        lines.append(f"{device}: {status['backend']}: {status['reason']}")
        if "bfloat16_matmul" in status:
            lines.append(f"  bfloat16 matmul: {status['bfloat16_matmul']}")
        if "float32_dots" in status:
            lines.append(f"  float32 dots: {status['float32_dots']}")
    return "\n".join(lines)


def check(device, dtype, generator):
    """(label, error, tolerance) for each shape: the fused op on `device` in `dtype`, channels_last
    where the shape's index is odd, against the reference on the CPU."""
    results = []
    reference_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    for index, (inp, oup, kernel, ratio, dw, stride, activation) in enumerate(SHAPES):
        init = -(-oup // ratio)
        tensors = [torch.randn(shape, generator=generator).to(dtype) for shape in
                   ((2, inp, 17, 15), (init, inp, kernel, kernel), (init,), (init * (ratio - 1), 1, dw, dw),
                    (init * (ratio - 1),))]
        expected = ghost_module_reference(*(t.to(reference_dtype) for t in tensors), out_channels=oup,
                                          stride=stride, activation=activation)
        x, *weights = (t.to(device) for t in tensors)
        if index % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        actual = ghost_module(x, *weights, out_channels=oup, stride=stride, activation=activation)
        label = (f"{device} {str(dtype).removeprefix('torch.')}: ghost_module {inp} -> {oup}, k {kernel}, ratio "
                 f"{ratio}, dw {dw}, stride {stride}, {activation}{', channels_last' if index % 2 else ''}")
        results.append((label, _relative_error(actual.cpu(), expected), TOLERANCES[dtype]))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ghostkernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-check", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    print(report())
    if args.no_check:
        return 0
    settings = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        settings += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
    generator = torch.Generator().manual_seed(0)
    print("\nThe fused op against the reference (max relative error; random inputs):")
    # On the reference backend the check compares the reference with itself: say so.
    status = backends()
    unfused = [device for device in dict.fromkeys(d for d, _ in settings) if status[device]["backend"] == "reference"]
    failed = 0
    for device, dtype in settings:
        note = " (no fused kernel ran)" if device in unfused else ""
        for label, error, tolerance in check(device, dtype, generator):
            verdict = "ok" if error <= tolerance else "WRONG"
            failed += verdict != "ok"
            print(f"  {label}: {error:.1e} (tolerance {tolerance:g}) {verdict}{note}")
    print("all agree" if not failed else f"{failed} disagree: please report it with the output above")
    for device in unfused:
        print(f"{device}: no fused kernel ran, the PyTorch reference did (its backend's reason is above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
