"""The outer step's local work: per-layer buckets averaged in one pass give the bits of one
ring per bucket, and average + digest + apply make no full-size temporary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import hashlib

import pytest
import torch
import xxhash

from atoll.diloco import DiLoCo
from atoll.digest import PIECE_BYTES, tensor_digest

WORKER = Path(__file__).with_name("outer_step_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 120


def run_islands(world: int, mode: str) -> list[dict]:
    """`world` worker processes (gloo over 127.0.0.1); all are killed past TIMEOUT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode} workers did not finish in {TIMEOUT}s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def sequential_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """The digest as it was defined before pieces were hashed on threads: one piece after the other."""
    h = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.reshape(-1)
        h.update(f"{name}|{flat.dtype}|{tuple(flat.shape)}|".encode())
        step = PIECE_BYTES // flat.element_size()
        for start in range(0, flat.numel(), step):
            h.update(xxhash.xxh3_128_digest(flat[start : start + step].numpy().tobytes()))
    return h.hexdigest()


def test_digest_hashed_on_threads_equals_the_sequential_digest():
    for numel in (0, 1, PIECE_BYTES // 4, 3 * PIECE_BYTES // 4 + 5):
        values = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        tensors = [("outer", values), ("halves", values[::2].double())]
        assert tensor_digest(tensors) == sequential_digest(tensors)


def test_buckets_in_one_pass_equal_one_ring_per_bucket_on_every_island():
    islands = run_islands(2, "buckets")
    for result in islands:
        assert result["per-bucket"] == result["buckets"] == result["abandonable"]
        assert result["per-bucket calls"] == result["buckets calls"] == result["abandonable calls"] == 7
        assert result["per-bucket bytes"] == result["buckets bytes"] == result["abandonable bytes"] > 0
        assert result["changed"]
    assert islands[0]["buckets"] == islands[1]["buckets"]


def test_average_digest_and_apply_make_no_full_size_temporary():
    result = run_islands(1, "memory")[0]
    assert result["pseudo_grad_mean"] < 0  # outer - inner after the inner weights grew by 0.01
    # a torch.cat of the inner shards, a .tobytes() digest or a clone of the buffer would each add 200 MB
    assert result["grown"] < result["buffer"] // 4, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: pinned outer buffers and device shard copies")
def test_outer_buffers_are_pinned_and_round_trip_device_shards():
    model = torch.nn.Linear(64, 32, bias=False).cuda()
    diloco = DiLoCo(model, lr=1.0, momentum=0.0, nesterov=False)
    assert diloco.outer.is_pinned() and diloco.pseudo_grad.is_pinned()
    torch.testing.assert_close(diloco.outer.view(32, 64), model.weight.detach().cpu(), rtol=0, atol=0)
    with torch.no_grad():
        model.weight.add_(1.0)
    diloco._pseudo_gradient()
    assert torch.all(diloco.pseudo_grad == -1.0)
    diloco._scatter_outer()
    torch.testing.assert_close(model.weight.detach().cpu(), diloco.outer.view(32, 64), rtol=0, atol=0)
