"""What the benchmarks need to know about the machine they run on, and how far to trust a run.

- the floor's two rates, measured at the start of a run (copy bandwidth, float32 GEMM rate) or
  fixed with `--floor-rates GBPS,GFLOPS` to compare runs across machines;
- the CPU model and thread count for the header;
- the spread of a row's repeated timings, the `noisy` flag, and the "identical medians" check
  (a coarse clock or a descheduled process makes many rows read the same value, e.g. 7.999 ms);
- the optional PNG plot of the speedup and x-floor columns (matplotlib, the `bench` extra).

Shared by bench/report.py, bench/e2e.py and bench/conftest.py (pytest-benchmark).
"""

import platform
import statistics
import time
from dataclasses import dataclass

# The anchors of docs/architecture.md section 5: the reference Xeon (AVX-512, 2 threads). Only used when asked for,
# e.g. `--floor-rates 36,184` to reproduce the tables in bench/results/.
REFERENCE_RATES = (36e9, 184e9)

DEFAULT_NOISE = 0.2  # (p90 - p10) / median above which a row is flagged noisy
MATPLOTLIB_MISSING = ("--plot needs matplotlib, which is not installed: "
                      "pip install matplotlib (or pip install 'ghostkernels[bench]')")


@dataclass
class FloorRates:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    source: str  # "measured" or "given"

    def describe(self):
        return (f"floor rates ({self.source}): copy {self.copy_bytes_per_s / 1e9:.1f} GB/s, "
                f"float32 GEMM {self.matmul_flops_per_s / 1e9:.1f} GFLOP/s")


def parse_floor_rates(text):
    """'GBPS,GFLOPS' (e.g. '36,184') -> FloorRates in bytes/s and FLOP/s. Raises ValueError."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ValueError(f"--floor-rates wants GBPS,GFLOPS (e.g. 36,184), got {text!r}")
    try:
        gbps, gflops = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--floor-rates wants two numbers GBPS,GFLOPS (e.g. 36,184), got {text!r}") from None
    if not (gbps > 0 and gflops > 0) or gbps == float("inf") or gflops == float("inf"):
        raise ValueError(f"--floor-rates wants two positive finite numbers, got {text!r}")
    return FloorRates(gbps * 1e9, gflops * 1e9, "given")


def floor_rates_arg(text):
    """argparse `type=` for --floor-rates: a clean usage error instead of a traceback."""
    import argparse

    try:
        return parse_floor_rates(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_floor_rates_option(parser):
    parser.add_argument("--floor-rates", type=floor_rates_arg, metavar="GBPS,GFLOPS",
                        help="fixed floor rates instead of measuring them at the start of the run "
                             "(copy GB/s, float32 GEMM GFLOP/s; the reference Xeon of docs/architecture.md section 5: 36,184)")


def cpu_model():
    """/proc/cpuinfo's "model name", else platform.processor(), else platform.machine()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _median_seconds(fn, runs, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes=128 * 2**20, runs=9):
    """(bytes read + bytes written) / s of a float32 tensor copy of `nbytes`, far past the caches."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), runs)
    return 2 * src.numel() * 4 / seconds


def measure_matmul_rate(m=256, k=256, n=3136, runs=9):
    """FLOP/s of a float32 GEMM shaped like a Ghost module's 1x1 convolution (output channels x
    input channels @ input channels x pixels, 56x56 pixels), with torch's current thread count."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    out = torch.empty(m, n)
    seconds = _median_seconds(lambda: torch.mm(a, b, out=out), runs, warmup=3)
    return 2 * m * k * n / seconds


def floor_rates(given=None, threads=None):
    """`given` (a FloorRates from --floor-rates) or the two rates measured now, with `threads`
    intra-op threads (default: torch's current setting, restored afterwards)."""
    if given is not None:
        return given
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return FloorRates(measure_copy_bandwidth(), measure_matmul_rate(), "measured")
    finally:
        torch.set_num_threads(previous)


def machine_line(threads):
    import torch

    clock = time.get_clock_info("perf_counter")
    # torch's CPU capability picks ghostkernels' C++ build too (AVX512 or AVX2; csrc/isa.h)
    return (f"CPU: {cpu_model()}, {threads} threads, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; perf_counter resolution {clock.resolution * 1e9:.0f} ns")


# ---- spread of repeated timings -------------------------------------------------------------


def spread(samples):
    """(p90 - p10) / median of repeated timings. The middle 80% rather than max - min: one
    context switch or page fault among hundreds of calls stretches max - min but not the median;
    a disturbance that reaches a tenth of the calls moves p90, and that is what can move the
    median too. NaN with fewer than 2 samples."""
    samples = sorted(samples)
    if len(samples) < 2:
        return float("nan")
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    median = statistics.median(samples)
    return (deciles[-1] - deciles[0]) / median if median > 0 else float("inf")


def row_spread(samples_by_name):
    """The largest spread over a row's contenders ({name: [times]})."""
    spreads = [spread(s) for s in samples_by_name.values()]
    spreads = [s for s in spreads if s == s]
    return max(spreads) if spreads else float("nan")


def is_noisy(row_spread_value, threshold=DEFAULT_NOISE):
    return row_spread_value > threshold


def repeated_medians(medians_ms, min_count=3, min_fraction=0.25, min_ms=0.05, tolerance_ms=0.005):
    """(value ms, count, total) when too many timed values share one median, else None.

    Unrelated kernels do not land on the same microsecond: when at least `min_count` values and
    `min_fraction` of all of them lie within `tolerance_ms` of one another (values under `min_ms`
    are left out, where such coincidences are plausible), the clock or the scheduler made them."""
    values = sorted(v for v in medians_ms if v == v and v >= min_ms)
    best, start = (0, 0.0), 0
    for end, value in enumerate(values):
        while value - values[start] > tolerance_ms:
            start += 1
        if end - start + 1 > best[0]:
            best = (end - start + 1, statistics.median(values[start:end + 1]))
    count, value = best
    if values and count >= min_count and count >= min_fraction * len(values):
        return value, count, len(values)
    return None


def whole_millisecond_medians(medians_ms, min_count=3, min_fraction=0.5, min_ms=1.0, tolerance_ms=0.010):
    """(count, total) when too many medians of 1 ms and more sit on a whole millisecond, else None.

    Under a loaded scheduler each call waits out whole scheduling ticks and the medians read
    7.998, 47.993, 78.008 ms; on a quiet machine a median lands within 10 us of a whole
    millisecond about 2% of the time."""
    values = [v for v in medians_ms if v == v and v >= min_ms]
    count = sum(1 for v in values if abs(v - round(v)) <= tolerance_ms)
    if values and count >= min_count and count >= min_fraction * len(values):
        return count, len(values)
    return None


def noise_summary(rows, threshold, medians_ms):
    """Lines to print after a table: how many rows were noisy, and the clock warnings."""
    lines = []
    noisy = sum(1 for r in rows if r.get("noisy"))
    if noisy:
        lines.append(f"WARNING: {noisy} of {len(rows)} rows were disturbed (spread of repeated timings "
                     f"(p90 - p10) / median above {threshold:.0%}, marked 'noisy'); repeat the run on a quiet machine.")
    else:
        lines.append(f"no row above the noise threshold (spread (p90 - p10) / median at most {threshold:.0%}).")
    repeated = repeated_medians(medians_ms)
    if repeated:
        value, count, total = repeated
        lines.append(f"WARNING: {count} of {total} medians read the same {value:.3f} ms (within 5 us): a coarse "
                     "clock or a descheduled process, not the kernels; do not trust these times or ratios, "
                     "repeat the run on a quiet machine.")
    ticks = whole_millisecond_medians(medians_ms)
    if ticks:
        count, total = ticks
        lines.append(f"WARNING: {count} of {total} medians over 1 ms sit on a whole millisecond (within 10 us): "
                     "the calls are waiting out scheduler ticks (a loaded machine), not running; "
                     "repeat the run on a quiet machine.")
    return lines


# ---- plot -----------------------------------------------------------------------------------


def import_pyplot():
    """matplotlib.pyplot with the file-only Agg backend; SystemExit with install advice if missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rows(rows, path, baseline, title=""):
    """A PNG with two bar charts per row label: speedup (baseline / fused) and fused / floor.
    Noisy rows are hatched and labelled. Rows need shape, batch, fused, floor, baseline, noisy."""
    plt = import_pyplot()
    labels = [f"{r['shape']} b{r['batch']}" + (" *" if r.get("noisy") else "") for r in rows]
    speedups = [r[baseline] / r["fused"] for r in rows]
    floors = [r["fused"] / r["floor"] for r in rows]
    have_floor = any(f == f for f in floors)
    panels = 2 if have_floor else 1
    height = max(3.0, 0.32 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, height), sharey=True, squeeze=False)
    positions = list(range(len(rows)))
    charts = [(axes[0][0], speedups, f"speedup ({baseline} / fused)", 1.0, "tab:blue")]
    if have_floor:
        charts.append((axes[0][1], floors, "x floor (fused / floor)", 1.0, "tab:orange"))
    for ax, values, xlabel, reference, color in charts:
        shown = [v if v == v else 0.0 for v in values]
        bars = ax.barh(positions, shown, color=color)
        for bar, row, value in zip(bars, rows, values):
            if row.get("noisy"):
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            ax.annotate(f"{value:.2f}x" if value == value else "n/a", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.axvline(reference, color="black", linewidth=0.8, linestyle="--")
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(max(shown, default=1.0), reference) * 1.2)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions)
    axes[0][0].set_yticklabels(labels, fontsize=8)
    axes[0][0].invert_yaxis()
    if any(r.get("noisy") for r in rows):
        title = (title + "\n" if title else "") + "* / hatched: noisy row (repeat on a quiet machine)"
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
