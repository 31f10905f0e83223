import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import DEFAULT_NOISE, floor_rates, floor_rates_arg, machine_line, noise_summary, spread  # noqa: E402

THREADS = 2  # what test_bench_cpu.py's two_threads fixture sets


def pytest_addoption(parser):
    group = parser.getgroup("ghostkernels bench")
    group.addoption("--floor-rates", type=floor_rates_arg, metavar="GBPS,GFLOPS", default=None,
                    help="fixed floor rates (copy GB/s, float32 GEMM GFLOP/s) instead of measuring them")
    group.addoption("--noise", type=float, default=DEFAULT_NOISE,
                    help="flag benchmarks whose (p90 - p10) / median exceeds this fraction")


def benchmarks_enabled(config):
    return not (config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False))


def rates_of(config):
    """The floor rates of this run: --floor-rates, or measured once (with THREADS threads) when
    benchmarks are enabled; None when they are not (the benchmarks then run once, untimed)."""
    if not hasattr(config, "_ghost_floor_rates"):
        given = config.getoption("floor_rates")
        config._ghost_floor_rates = given if given or not benchmarks_enabled(config) else floor_rates(None, THREADS)
    return config._ghost_floor_rates


def pytest_report_header(config):
    rates = rates_of(config)
    return [machine_line(THREADS)] + ([rates.describe()] if rates else [])


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cpu_model_name"] = machine_line(THREADS)
    rates = rates_of(config)
    if rates:
        machine_info["floor_rates"] = rates.describe()


@pytest.fixture
def floor_rates_fixture(request):
    return rates_of(request.config)


@pytest.fixture
def noise_check(request):
    """Call with the benchmark fixture after benchmark(...): stores the spread of its rounds
    (and the floor, if given) in extra_info, and counts noisy benchmarks for the summary."""
    config = request.config
    config._ghost_noise_rows = getattr(config, "_ghost_noise_rows", [])

    def check(benchmark, floor=None):
        if benchmark.stats is None:  # --benchmark-disable: one untimed call
            return
        data = [t * 1e3 for t in benchmark.stats.stats.data]
        value = spread(data)
        noisy = value > config.getoption("noise")
        benchmark.extra_info.update(spread=value, noisy=noisy)
        if floor is not None:
            benchmark.extra_info["floor_ms"] = floor
        config._ghost_noise_rows.append(dict(name=request.node.name, noisy=noisy,
                                             median=benchmark.stats.stats.median * 1e3))

    return check


def pytest_terminal_summary(terminalreporter, config):
    rows = getattr(config, "_ghost_noise_rows", [])
    if rows:
        for line in noise_summary(rows, config.getoption("noise"), [r["median"] for r in rows]):
            terminalreporter.write_line(line)
        for r in rows:
            if r["noisy"]:
                terminalreporter.write_line(f"  noisy: {r['name']}")
