"""Data-parallel training with PyTorch's own engine: two processes (gloo, CPU) under
DistributedDataParallel give the same gradients as one process on the whole batch. GroupNorm
needs no cross-replica statistics (each group row lives in one sample); only dweight/dbias are
summed, by DDP's all-reduce, with no code of ours in between."""

import os
import socket
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import groupnorm.torch as gt


def _model():
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), gt.GroupNormSiLU(4, 16), nn.Conv2d(16, 16, 3, padding=1),
        gt.GroupNorm(4, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )


def _batch():
    g = torch.Generator().manual_seed(6)
    return torch.randn(8, 3, 10, 10, generator=g), torch.randint(0, 3, (8,), generator=g)


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x, t = _batch()
        per = x.shape[0] // world
        loss = F.cross_entropy(model(x[rank * per:(rank + 1) * per]), t[rank * per:(rank + 1) * per])
        loss.backward()
        if rank == 0:
            torch.save([p.grad for p in model.module.parameters()], out)
        # neither rank tears down its gloo connections while the other still uses them (without
        # this, one run in the whole suite ended with a rank killed by SIGABRT in teardown)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process():
    model = _model()
    x, t = _batch()
    F.cross_entropy(model(x), t).backward()
    whole = [p.grad for p in model.parameters()]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "grads.pt")
        try:
            mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        except mp.ProcessExitedException as e:
            # Once in about five runs of the whole suite on a loaded 2-core machine a rank died by
            # SIGABRT in gloo's setup or teardown (never in our op: alone, the test passed every
            # time). One more try on a fresh port; a second failure fails the test.
            warnings.warn(f"DDP run retried after: {e}")
            mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        ddp = torch.load(out)
    assert len(ddp) == len(whole)
    for i, (a, b) in enumerate(zip(ddp, whole)):
        # mean of two half-batch means = the whole-batch mean; only the summation order differs
        err = (a - b).norm().item()
        assert err <= 1e-5 * max(b.norm().item(), 1e-6), f"parameter {i}: {err:.3e} vs norm {b.norm().item():.3e}"
