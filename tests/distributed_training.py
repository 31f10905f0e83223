"""The processes of tests/test_train.py::test_distributed_data_parallel. A module of its own,
which the spawned processes import by name: it must not import `conftest`, a name that
bench/conftest.py also has on the test run's path."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import ghostkernels
from ghostkernels.models import ghostnet


def worker(rank, world, port, path):
    """One process of test_distributed_data_parallel: DDP (gloo) over the accelerated model, its
    half of the batch; rank 0 saves the averaged gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, x, y = problem()
        fast = ghostkernels.accelerate(model, check=False)
        ddp = DistributedDataParallel(fast)  # held until backward: its reducer averages the grads
        half = x.shape[0] // world
        F.cross_entropy(ddp(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in fast.named_parameters()}, path)
    finally:
        dist.destroy_process_group()


def problem():
    """The same float64 GhostNet 0.5x (original modules, training mode) and batch in every process."""
    torch.manual_seed(0)
    model = ghostnet(0.5, num_classes=10, fused=False).double().train()
    model.dropout = 0.0  # no random masks: the processes' and the reference's must match
    return model, torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randint(0, 10, (4,))
