"""Build (or load) a GhostNet, accelerate it, check that it computes the same, time both.

    OPENBLAS_NUM_THREADS=1 python examples/accelerate_ghostnet.py [checkpoint.pth]

A checkpoint of the original Huawei code or of timm's ghostnet_100 loads as it is.
"""

import statistics
import sys
import time

import torch

import ghostkernels
from ghostkernels.models import ghostnet_100


def median_ms(fn, runs=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    torch.set_num_threads(2)
    model = ghostnet_100(fused=False)  # the model as the original code runs it
    if len(sys.argv) > 1:
        model.load_state_dict(torch.load(sys.argv[1], map_location="cpu"), strict=True)
    model.eval()
    fast = ghostkernels.accelerate(model)
    print(fast.acceleration_summary.__str__().splitlines()[0])
    print("backends:", ghostkernels.backends()["cpu"])

    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected, actual = model(x), fast(x)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        print(f"same output (max difference {(actual - expected).abs().max().item():.2e})")
        eager_ms, fast_ms = median_ms(lambda: model(x)), median_ms(lambda: fast(x))
    print(f"batch 1: eager {eager_ms:.2f} ms, accelerated {fast_ms:.2f} ms ({eager_ms / fast_ms:.2f}x)")


if __name__ == "__main__":
    main()
