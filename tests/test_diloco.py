"""DiLoCo's outer step: buckets, exact Nesterov SGD, and averaging across real processes (gloo)."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, outer_step

from atoll.comm.allreduce import GlobalMean, ring_bytes
from atoll.comm.codecs import get_codec
from atoll.diloco import DiLoCo, layer_buckets
from atoll.digest import tensor_digest
from atoll.model import Llama, get_size
from atoll.data.cursor import island_first_sample

PROCESS_TIMEOUT_S = 90


def fp32_mean(group: dist.ProcessGroup) -> GlobalMean:
    return GlobalMean([group], get_codec("fp32"), deadline_s=30.0, chunk_bytes=1 << 20)


def debug_model() -> Llama:
    torch.manual_seed(0)
    return Llama(get_size("debug"))


def perturb(model: torch.nn.Module, rank: int, outer_step: int) -> None:
    """Stand-in for an inner phase: a deterministic, rank- and step-specific change of every weight."""
    gen = torch.Generator().manual_seed(1000 * outer_step + rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01 * (rank + 1))


def reference_outer_weights(world: int, outer_steps: int, lr: float, momentum: float) -> list[torch.Tensor]:
    """What every island must hold: torch.optim.SGD (Nesterov) on one process, fed the mean pseudo-gradient."""
    outer = [p.detach().clone() for p in debug_model().parameters()]
    params = [torch.nn.Parameter(t) for t in outer]
    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    for step in range(outer_steps):
        inners = []
        for rank in range(world):
            model = debug_model()
            with torch.no_grad():
                for p, o in zip(model.parameters(), params):
                    p.copy_(o)
            perturb(model, rank, step)
            inners.append([p.detach() for p in model.parameters()])
        for i, p in enumerate(params):
            p.grad = torch.stack([p.detach() - inner[i] for inner in inners]).mean(0)
        sgd.step()
    return [p.detach() for p in params]


def test_buckets_are_one_per_block_and_cover_the_buffer():
    model = debug_model()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    buckets = layer_buckets(names, sizes)
    # tok_embeddings, one per block, norm, output
    assert len(buckets) == 1 + get_size("debug").n_layers + 2
    assert buckets[0].start == 0 and buckets[-1].stop == sum(sizes)
    assert all(a.stop == b.start for a, b in zip(buckets, buckets[1:]))
    block0 = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.0."))
    assert buckets[1].stop - buckets[1].start == block0


def test_outer_step_on_one_island_is_exactly_nesterov_sgd():
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=10))
    model = debug_model()
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    mean = fp32_mean(group)
    for step in range(3):
        perturb(model, 0, step)
        outer_step(diloco, mean)
    expected = reference_outer_weights(1, 3, 0.7, 0.9)
    for got, want in zip(model.parameters(), expected):
        assert torch.equal(got.detach(), want)
    assert mean.wire.bytes_sent == 0  # one island sends nothing


def _island(rank: int, world: int, port: int, outer_steps: int, lr: float, momentum: float, results) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=30))
    group = dist.ProcessGroupGloo(dist.PrefixStore("test/", store), rank, world, timedelta(seconds=30))
    model = debug_model()
    diloco = DiLoCo(model, lr=lr, momentum=momentum, nesterov=momentum > 0)
    mean = fp32_mean(group)
    digests = []
    for step in range(outer_steps):
        perturb(model, rank, step)
        digests.append(outer_step(diloco, mean))
    expected = reference_outer_weights(world, outer_steps, lr, momentum)
    max_err = max((got.detach() - want).abs().max().item() for got, want in zip(model.parameters(), expected))
    results.put((rank, digests, max_err, mean.wire.bytes_sent, diloco.outer.numel(), len(diloco.buckets)))


def run_islands(world: int, outer_steps: int, lr: float, momentum: float) -> list[tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_island, args=(r, world, port, outer_steps, lr, momentum, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=PROCESS_TIMEOUT_S) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return sorted(out)


@pytest.mark.parametrize("world", [3])  # an odd world: a ring whose segments differ in size
def test_outer_lr_one_without_momentum_averages_the_islands_weights(world):
    out = run_islands(world, outer_steps=1, lr=1.0, momentum=0.0)
    for _, _, max_err, _, _, _ in out:
        assert max_err < 1e-6
    assert len({tuple(d) for _, d, _, _, _, _ in out}) == 1


def test_nesterov_outer_steps_across_islands_match_sgd_on_the_mean_pseudo_gradient():
    out = run_islands(3, outer_steps=3, lr=0.7, momentum=0.9)
    digests = {tuple(d) for _, d, _, _, _, _ in out}
    assert len(digests) == 1  # bit-identical outer weights on every island after every outer step
    numel, buckets = out[0][4], out[0][5]
    for _, _, max_err, sent, _, _ in out:
        assert max_err < 1e-6
        # per-layer buckets: each moves 2(n-1)/n of its bytes, up to one value per uneven ring segment
        assert abs(sent - 3 * ring_bytes(numel, 4, 3)) <= 3 * buckets * 3 * 4


def test_islands_and_local_ranks_read_disjoint_data_while_membership_changes():
    from atoll.data import PackedLoader

    tokens = torch.arange(100_000).numpy().astype("uint32")
    local_ranks, per_island_batch = 2, 4
    loaders = [PackedLoader(tokens, 16, per_island_batch, r, local_ranks, seed=0) for r in range(local_ranks)]
    seen, cursor = [], 0
    for islands in (3, 3, 2, 4, 1, 4):  # the epoch's world size at each inner step
        for i in range(islands):
            for loader in loaders:
                inputs, _ = loader.batch_at(island_first_sample(cursor, i, per_island_batch))
                assert inputs.shape == (per_island_batch // local_ranks, 16)
                seen.extend(int(row[0]) for row in inputs)
        cursor += islands * per_island_batch
    assert len(seen) == len(set(seen)) == per_island_batch * 17


class Shards(torch.nn.Module):
    """Parameters whose boundaries fall inside update spans and digest pieces; one is not contiguous."""

    def __init__(self, sizes: list[int], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.flat = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes)
        self.transposed = torch.nn.Parameter(torch.randn(7, 129, generator=gen).t())


@pytest.mark.parametrize("sizes", [[5], [3 * (1 << 18) + 17, 1 << 20, 1000], [(1 << 20) + 64, 0, 63]])
@pytest.mark.parametrize("momentum, nesterov", [(0.9, True), (0.9, False), (0.0, False)])
def test_apply_is_bitwise_torch_sgd_with_inner_weights_and_digest(sizes, momentum, nesterov):
    model = Shards(sizes, seed=0)
    diloco = DiLoCo(model, lr=0.7, momentum=momentum, nesterov=nesterov)
    outer = torch.nn.Parameter(diloco.outer.clone())
    sgd = torch.optim.SGD([outer], lr=0.7, momentum=momentum, nesterov=nesterov)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grad = torch.randn(outer.numel(), generator=gen) * 1e-3
        grad[: 1 << 10] = 0.0  # an all-zero span start
        grad[-1] = float("nan") if step == 2 else grad[-1]
        diloco.pseudo_grad.copy_(grad)
        outer.grad = grad.clone()
        state = [("outer", outer)] + ([("momentum", sgd.state[outer]["momentum_buffer"])] if momentum and step else [])
        assert diloco.agreement_digest() == tensor_digest([*state, ("pseudo_grad", grad)])
        digest = diloco.apply()
        sgd.step()
        assert torch.equal(diloco.outer.view(torch.int32), outer.detach().view(torch.int32))
        if momentum:
            want = sgd.state[outer]["momentum_buffer"]
            assert torch.equal(diloco.optimizer.state[diloco.outer]["momentum_buffer"].view(torch.int32), want.view(torch.int32))
        inner = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert torch.equal(inner.view(torch.int32), outer.detach().view(torch.int32))
        state = [("outer", outer)] + ([("momentum", sgd.state[outer]["momentum_buffer"])] if momentum else [])
        assert digest == tensor_digest(state) == diloco.restore_inner()


def test_kept_outer_digest_follows_every_write_to_the_outer_weights():
    diloco = DiLoCo(Shards([(1 << 20) + 5], seed=0), lr=0.7, momentum=0.9, nesterov=True)

    def fresh() -> str:
        momentum = diloco.optimizer.state[diloco.outer].get("momentum_buffer")
        state = [("outer", diloco.outer)] + ([("momentum", momentum)] if momentum is not None else [])
        return tensor_digest([*state, ("pseudo_grad", diloco.pseudo_grad)])

    diloco.apply()
    assert diloco.agreement_digest() == fresh()
    with torch.no_grad():
        diloco.outer[-3:].add_(1.0)  # a torch write through a view bumps the shared version counter
    assert diloco.agreement_digest() == fresh()
    diloco.apply()
    diloco.load_state_dict({"outer": torch.zeros_like(diloco.outer), "momentum": diloco.outer, "has_momentum": 1})
    assert diloco.agreement_digest() == fresh()
    diloco.apply()
    diloco.transfer_buffers()["outer"].numpy()[7] = 42.0  # raw memory: the transfer's own contract drops the digest
    diloco.took_state(True)
    assert diloco.agreement_digest() == fresh()
    diloco.optimizer.step()  # the public optimizer writes through torch ops too
    assert diloco.agreement_digest() == fresh()
    diloco.transfer_buffers()["momentum"].numpy()[3] = 7.0  # the momentum's raw writes are covered alike
    diloco.took_state(True)
    assert diloco.agreement_digest() == fresh()


def test_islands_whose_momentum_differs_disagree_before_and_after_the_outer_step():
    islands = [DiLoCo(Shards([4096], seed=0), lr=0.7, momentum=0.9, nesterov=True) for _ in range(2)]
    for diloco in islands:
        diloco.apply()  # a first step makes the momentum (from a zero pseudo-gradient)
    with torch.no_grad():
        islands[1].optimizer.state[islands[1].outer]["momentum_buffer"][5] += 1e-3
    assert torch.equal(islands[0].outer, islands[1].outer)
    assert islands[0].agreement_digest() != islands[1].agreement_digest()
    islands[1].optimizer.state[islands[1].outer]["momentum_buffer"][5] -= 1e-3  # agree again, then diverge at the last step
    assert islands[0].agreement_digest() == islands[1].agreement_digest()
    with torch.no_grad():
        islands[1].optimizer.state[islands[1].outer]["momentum_buffer"][9] = 1.0
        islands[1].pseudo_grad.zero_()
        islands[0].pseudo_grad.zero_()
    islands[0].anneal(0.0)
    islands[1].anneal(0.0)  # momentum 0: the weights stay equal, the momentum does not
    digests = [d.apply() for d in islands]
    assert torch.equal(islands[0].outer, islands[1].outer) and digests[0] != digests[1]
