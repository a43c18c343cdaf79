"""DDP ignores the frozen parameters (honed.train.backends.prepare_module): its start-up sync still gives
every rank rank 0's trained values, of each dtype, and the frozen weights are never sent (each rank
reads them from the same files; sending the demo's 540 MB base took 2.1 s on 2 CPU workers)."""

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from honed.train.backends import prepare_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # every value differs between the ranks
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    model[0].requires_grad_(False)  # the frozen base
    model[1].bias.data = model[1].bias.data.double()  # a second dtype among the trained parameters
    frozen = model[0].weight.detach().clone()
    module = prepare_module(model, torch.device("cpu"))
    inner = module.module
    out[rank] = {"trained": [p.detach().clone() for p in inner[1].parameters()],
                 "frozen_kept": bool(torch.equal(inner[0].weight, frozen)), "frozen": frozen,
                 "ddp": isinstance(module, torch.nn.parallel.DistributedDataParallel)}
    dist.destroy_process_group()


def test_trained_parameters_come_from_rank_zero_and_frozen_ones_stay():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(free_port(), out), nprocs=2)
        out = dict(out)
    assert out[0]["ddp"] and out[1]["ddp"]
    for mine, rank0 in zip(out[1]["trained"], out[0]["trained"]):
        assert torch.equal(mine, rank0) and mine.dtype == rank0.dtype
    assert out[1]["trained"][1].dtype == torch.float64
    assert out[0]["frozen_kept"] and out[1]["frozen_kept"]
    assert not torch.equal(out[0]["frozen"], out[1]["frozen"])  # never broadcast
