"""One island: its local process group, its device, and FSDP2 sharding of the model over it.

An island is one machine running L local ranks (launched by torchrun or `atoll train --nproc L`).
The island's group is torch's default process group: gloo on CPU, NCCL on CUDA. A plain
`python`/`atoll train` without torchrun is an island of one rank, with no sharding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from atoll.errors import UserError

# torchrun's contract: these variables describe the local job.
RANK_ENV = "RANK"
WORLD_SIZE_ENV = "WORLD_SIZE"
LOCAL_RANK_ENV = "LOCAL_RANK"

LOCAL_GROUP_TIMEOUT = timedelta(minutes=10)
CONTROL_GROUP_TIMEOUT = timedelta(hours=24)
"""How long local ranks wait for their leader's word from the mesh. The leader may wait at an
outer-step barrier for as long as the slowest island's inner phase, far longer than any local
collective should take; a leader that dies ends the whole island through torchrun at once."""


@dataclass(frozen=True)
class Island:
    """The local job as this process sees it."""

    rank: int
    """This process's rank in the island (torchrun's RANK)."""
    world: int
    """Local ranks in the island."""
    device: torch.device
    """Where this rank computes."""
    control: dist.ProcessGroup | None = None
    """gloo over the local ranks with CONTROL_GROUP_TIMEOUT: how the leader shares what it learnt
    from the coordinator (None on a 1-rank island)."""
    behind: dist.ProcessGroup | None = None
    """A second such group, for the outer step's work behind training (`diloco.overlap_steps`):
    its own, so that it never interleaves with the training thread's collectives on `control`."""

    @property
    def is_leader(self) -> bool:
        """Local rank 0 writes logs, metrics and the run directory's files."""
        return self.rank == 0

    def behind_training(self) -> Island:
        """The island as a thread working behind training sees it: `behind` as its control group."""
        return replace(self, control=self.behind)

    @property
    def mixed_precision(self) -> bool:
        """bf16 compute with fp32 master weights on CUDA; plain fp32 on CPU."""
        return self.device.type == "cuda"


def start_island(device_pref: str) -> Island:
    """Join the island's process group (creating a 1-rank one outside torchrun) and pick the device."""
    rank = int(os.environ.get(RANK_ENV, 0))
    world = int(os.environ.get(WORLD_SIZE_ENV, 1))
    local_rank = int(os.environ.get(LOCAL_RANK_ENV, rank))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is visible: set --train.device cpu")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if RANK_ENV in os.environ:
            dist.init_process_group(backend, timeout=LOCAL_GROUP_TIMEOUT, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=LOCAL_GROUP_TIMEOUT)
    if world == 1:
        return Island(rank=rank, world=world, device=device)
    control = dist.new_group(backend="gloo", timeout=CONTROL_GROUP_TIMEOUT)
    behind = dist.new_group(backend="gloo", timeout=CONTROL_GROUP_TIMEOUT)
    return Island(rank=rank, world=world, device=device, control=control, behind=behind)


def stop_island() -> None:
    """Leave the island's process group (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, island: Island) -> nn.Module:
    """FSDP2 over the local group: each transformer block is one unit, then the root.

    A 1-rank island is left unsharded (FSDP would only add copies). On CUDA, parameters are
    gathered in bf16 and gradients reduced in fp32. Works on a model built on the meta device
    (nothing is allocated; `to_empty` then materialises only this rank's shards). The root
    (embedding, final norm, head) stays gathered after forward: backward needs it at once.
    """
    if island.world == 1:
        return model
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if island.mixed_precision else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return model


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's part of a parameter and the index of its first row (dim 0) in the full one.

    FSDP2 shards dim 0 like `torch.chunk`: rank r holds rows [r * ceil(n / W), ...), possibly
    none. A plain tensor or a replicated DTensor is all of itself, from row 0. Raises ValueError
    for any other layout (atoll only shards dim 0 over the island's 1-D mesh).
    """
    if not isinstance(param, DTensor):
        return param, 0
    local = param.to_local()
    if all(isinstance(p, Replicate) for p in param.placements):
        return local, 0
    if param.device_mesh.ndim != 1 or param.placements != (Shard(0),):
        raise ValueError(f"only dim-0 sharding over a 1-D mesh is supported, got {param.placements}")
    rows = param.shape[0]
    per_rank = -(-rows // param.device_mesh.size())
    start = min(param.device_mesh.get_local_rank() * per_rank, rows)
    if local.shape[0] != min(per_rank, rows - start):
        raise ValueError(f"local shard of {local.shape[0]} rows does not match chunked sharding of {rows} rows")
    return local, start


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the island's ranks (a copy; the input is untouched)."""
    out = value.detach().clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def broadcast_text(text: str, island: Island) -> str:
    """Local rank 0's string, on every rank (e.g. a run directory with rank 0's timestamp)."""
    if island.world == 1:
        return text
    payload = torch.zeros(4096, dtype=torch.uint8, device=island.device)
    if island.is_leader:
        raw = text.encode()
        payload[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(payload, src=0)
    return bytes(payload.cpu().tolist()).rstrip(b"\0").decode()


def check_same_on_all_ranks(text: str, island: Island, what: str) -> None:
    """Raise RuntimeError unless every local rank holds the same string (e.g. a weights digest)."""
    leader = broadcast_text(text, island)
    if leader != text:
        raise RuntimeError(f"{what} differs across local ranks: rank {island.rank} has {text}, rank 0 has {leader}")


def broadcast_ints(values: list[int], island: Island) -> list[int]:
    """Local rank 0's integers, on every rank (how the island leader shares what it saw in the store).

    Over the control group: the other ranks wait here as long as the leader waits on the mesh.
    """
    if island.world == 1:
        return values
    payload = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(payload, src=0, group=island.control)
    return [int(v) for v in payload.tolist()]


def gather_ints(value: int, island: Island) -> list[int]:
    """Every local rank's integer, in rank order, on every rank (over the control group)."""
    if island.world == 1:
        return [value]
    everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(island.world)]
    dist.all_gather(everyone, torch.tensor([value], dtype=torch.int64), group=island.control)
    return [int(t.item()) for t in everyone]


def all_ranks_ok(ok: bool, island: Island) -> bool:
    """True only if every local rank says ok (so the island acts as one)."""
    if island.world == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=island.control)
    return bool(flag.item())
