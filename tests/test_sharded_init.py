"""Sharded initialisation: each local rank fills its own shard, the full weights and their digest
do not depend on the number of ranks, and start-up host memory is O(shard)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port

from atoll.config import JobConfig
from atoll.digest import model_digest
from atoll.island import Island
from atoll.model import SIZES, Llama, ModelArgs, count_params
from atoll.model_setup import build_model
from sharded_init_worker import stepped_weights

WORKER = Path(__file__).with_name("sharded_init_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 120


def run_ranks(world: int, spec: dict) -> list[dict]:
    """Start `world` local ranks of the worker (gloo on CPU); kill them all past TIMEOUT."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{world} ranks did not finish in {TIMEOUT}s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


# Row counts that 4 ranks do not divide evenly, and a head spanning several init chunks.
UNEVEN = dataclasses.replace(SIZES["debug"], vocab_size=16411, dim=72, n_heads=4, n_kv_heads=2, ffn_hidden=190)


def build_one_rank(args: ModelArgs, seed: int) -> tuple[torch.nn.Module, str]:
    """build_model on a 1-rank island, in this process."""
    island = Island(rank=0, world=1, device=torch.device("cpu"))
    return build_model(args, JobConfig.model_validate({"train": {"seed": seed}}), island)


def test_full_model_digest_is_the_same_for_1_2_and_4_local_ranks():
    model, one = build_one_rank(UNEVEN, 11)
    torch.manual_seed(11)
    assert model_digest(Llama(UNEVEN)) == one  # the eager build draws the same weights
    assert build_one_rank(UNEVEN, 12)[1] != one
    spec = {"args": dataclasses.asdict(UNEVEN), "seed": 11}
    for world in (2, 4):
        assert [r["digest"] for r in run_ranks(world, spec)] == [one] * world


def test_start_up_peak_host_memory_is_a_shard_plus_a_constant():
    # ~180M parameters: 0.72 GB full in fp32, 0.36 GB per rank on 2 ranks.
    args = dataclasses.replace(SIZES["150m"], dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_hidden=4096,
                               max_seq_len=256)
    full_bytes = count_params(args)["total"] * 4
    constant = 150 * 2**20  # init chunks, row digests, allocator slack
    for result in run_ranks(2, {"args": dataclasses.asdict(args), "seed": 0}):
        grown = result["peak_after"] - result["peak_before"]
        assert result["shard_bytes"] <= full_bytes // 2 + 2**20
        assert grown < result["shard_bytes"] + constant < full_bytes, (grown, result)


def test_four_micro_batches_on_two_ranks_equal_one_batch_on_one_rank():
    # SGD(lr=1) turns the weights into initial weights minus the gradient: equal weights, equal gradients.
    args = SIZES["debug"]
    island = Island(rank=0, world=1, device=torch.device("cpu"))
    one_rank = torch.tensor(stepped_weights(args, JobConfig.model_validate({"train": {"seed": 3}}), island, 1))
    for rank in run_ranks(2, {"args": dataclasses.asdict(args), "seed": 3, "accum": [4, 1]}):
        for weights in rank["stepped"]:
            torch.testing.assert_close(torch.tensor(weights), one_rank, rtol=1e-5, atol=1e-6)
    before = torch.cat([p.detach().reshape(-1) for p in build_one_rank(args, 3)[0].parameters()])[::97]
    assert (before - one_rank).abs().max() > 1e-4  # the step moved the weights
