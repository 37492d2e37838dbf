"""DDP and FSDP2 with two CPU processes on gloo: first-batch init synchronised, gradients reduced and correct."""

import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_tiny_model

from lowbit.train import TrainQuantConfig, convert, quantized_layers

WORLD = 2
CONFIG = TrainQuantConfig(seed=11)


def _batch():
    return torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(5))


def _act_steps(model):
    return torch.stack([m.act_step.detach().clone() for m in quantized_layers(model).values()])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@contextmanager
def _gloo_group(rank: int, init_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    with _gloo_group(rank, init_file):
        ids = _batch()
        shard = ids[rank * 2 : rank * 2 + 2]
        result = {}
        # Lazy first-batch init on different data per rank: averaged over the group (or not, as a control)
        for sync in (True, False):
            m = convert(make_tiny_model("llama"), CONFIG.with_(sync_init=sync))
            with torch.no_grad():
                m(shard)
            steps = _act_steps(m)
            gathered = [torch.zeros_like(steps) for _ in range(WORLD)]
            dist.all_gather(gathered, steps)
            result[f"steps_equal_sync_{sync}"] = bool(torch.equal(gathered[0], gathered[1]))
        model = convert(make_tiny_model("llama").train(), CONFIG)
        with torch.no_grad():
            model(ids)  # the same init batch on every rank
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss = ddp(shard, labels=shard).loss
        loss.backward()
        result["grads"] = _grads(model)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["steps_equal_sync_True"] for r in ranks)
    assert not any(r["steps_equal_sync_False"] for r in ranks)  # the control: without sync they differ

    _check_against_shard_average(ranks[0]["grads"], ranks[1]["grads"])


def _reference_grads() -> list[dict]:
    """Each shard's gradient from an identically seeded model in this process."""
    ids = _batch()
    ref = []
    for rank in range(WORLD):
        model = convert(make_tiny_model("llama").train(), CONFIG)
        with torch.no_grad():
            model(ids)
        shard = ids[rank * 2 : rank * 2 + 2]
        model(shard, labels=shard).loss.backward()
        ref.append(_grads(model))
    return ref


def _check_against_shard_average(g0: dict, g1: dict) -> None:
    ref = _reference_grads()
    assert g0.keys() == ref[0].keys() and len(g0) > 10
    differ = 0
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name  # all-reduced: identical on every rank
        mean = (ref[0][name] + ref[1][name]) / 2
        assert torch.allclose(g0[name], mean, atol=1e-6, rtol=1e-4), name
        differ += not torch.allclose(ref[0][name], ref[1][name])
    assert differ > 10  # the shards really had different gradients


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with _gloo_group(rank, init_file):
        ids = _batch()
        model = convert(make_tiny_model("llama").train(), CONFIG)
        with torch.no_grad():
            model(ids)  # the same init batch on every rank
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        shard = ids[rank * 2 : rank * 2 + 2]
        model(shard, labels=shard).loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        torch.save(grads, os.path.join(out_dir, f"fsdp{rank}.pt"))


@pytest.mark.slow
def test_fsdp2_two_processes_gloo(tmp_path):
    """fully_shard over every block and the root (the LSQ steps are one-element tensors, as FSDP2 requires)."""
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    g0, g1 = (torch.load(tmp_path / f"fsdp{r}.pt") for r in range(WORLD))
    _check_against_shard_average(g0, g1)
