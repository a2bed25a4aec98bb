"""torchrun's environment, process-group set-up and the few collectives the loop needs."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from la import UserError


@dataclass
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup(device_name=None):
    """Read RANK/LOCAL_RANK/WORLD_SIZE (torchrun); one process without them. gloo on CPU, nccl on CUDA."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device_name is None else device_name == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # torchrun keeps its store across the restarts it makes (--max-restarts): without a prefix of their own, a
        # restarted group's ranks read the dead group's addresses and never connect
        store, _, _ = next(dist.rendezvous("env://", rank, world_size))
        store = dist.PrefixStore(f"la/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                device_id=device if use_cuda else None)
    return Context(rank, local_rank, world_size, device)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (a no-op for one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def check_same(value, what):
    """Fail on every rank if a value (e.g. the split manifest and its hashes) differs between ranks."""
    if not dist.is_initialized():
        return
    values = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(values, value)
    except RuntimeError:  # a peer exited (its own error is in its log) before the comparison
        raise UserError(f"cannot compare the {what} with the other ranks: one of them failed during start-up; see its log")
    if any(v != values[0] for v in values):
        if all(isinstance(v, dict) for v in values):  # name only the fields that differ
            keys = sorted({k for v in values for k in v if any(w.get(k) != v.get(k) for w in values)})
            values = [{k: v.get(k) for k in keys} for v in values]
        raise UserError(f"{what} differs between ranks: " + "; ".join(f"rank {r}: {v}" for r, v in enumerate(values)))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def sync_buffers(module):
    """Give every rank rank 0's batch-norm statistics, the ones the checkpoint saves.

    DDP broadcasts buffers at the start of each forward, so after the last step of an
    epoch each rank still holds the statistics of its own last shard.
    """
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def launcher():
    """How this process was started, for a resume hint: the same world size gives the same run."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world == 1:
        return ["python"]
    nodes = [f"--nnodes={world // local}", "<your rendezvous flags>"] if world > local else []
    return ["torchrun"] + nodes + [f"--nproc_per_node={local}"]
