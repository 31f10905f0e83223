"""pytest-benchmark microbenchmarks of the CPU kernels on the GhostNet 1.0x shapes.

    OPENBLAS_NUM_THREADS=1 pytest bench --benchmark-enable --benchmark-group-by=param:shape,param:batch
    OPENBLAS_NUM_THREADS=1 pytest bench --benchmark-enable -k '16_16_112 and test_forward'

Compare the `fused` rows with `eager` and `reference` in each group (medians, 2 threads). The header
gives the CPU and the floor rates (measured at the start, or `--floor-rates GBPS,GFLOPS`); each
forward benchmark's extra_info (--benchmark-json) holds its floor_ms, and every benchmark's the
spread of its rounds ((p90 - p10) / median); the summary counts those above `--noise` (0.2).
"""

import pytest
import torch

from cases import GHOSTNET_SHAPES, floor_ms, make_case, make_training_case

# ids like 16_48_112 (inp_oup_size) so that `-k` can select them
SHAPES = {'_'.join(map(str, s)): s for s in GHOSTNET_SHAPES}


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("contender", ["eager", "reference", "fused"])
def test_forward(benchmark, noise_check, floor_rates_fixture, contender, shape, batch):
    _, _, fns = make_case(*SHAPES[shape], batch)
    with torch.no_grad():
        benchmark(fns[contender])
    rates = floor_rates_fixture
    noise_check(benchmark, rates and floor_ms(*SHAPES[shape], batch, copy_bytes_per_s=rates.copy_bytes_per_s,
                                              matmul_flops_per_s=rates.matmul_flops_per_s))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("contender", ["reference", "fused"])
def test_forward_backward(benchmark, noise_check, contender, shape, batch):
    benchmark(make_training_case(*SHAPES[shape], batch)[contender])
    noise_check(benchmark)
