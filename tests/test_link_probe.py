"""Measuring an epoch's links (`atoll.mesh.link_probe`) across real processes on gloo."""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from datetime import timedelta

import pytest
from conftest import free_port

MEMBERS = ("c", "a", "b")
"""Rank order as an epoch in measured ring order hands it out: not sorted."""
TIMEOUT_S = 60


def _probing_island(port: int, rank: int, results: multiprocessing.Queue) -> None:
    try:
        import torch.distributed as dist

        from atoll.mesh.link_probe import probe_links

        store = dist.TCPStore("127.0.0.1", port, len(MEMBERS), rank == 0, timedelta(seconds=20))
        group = dist.ProcessGroupGloo(store, rank, len(MEMBERS), timedelta(seconds=20))
        links = probe_links(group, MEMBERS, rank)
        results.put((MEMBERS[rank], {peer: (link.throughput, link.rtt) for peer, link in links.items()}))
    except BaseException:
        results.put((MEMBERS[rank], traceback.format_exc()))
        raise


@pytest.mark.timeout(TIMEOUT_S)
def test_every_member_measures_its_link_to_every_other_member_once():
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_probing_island, args=(port, rank, results)) for rank in range(len(MEMBERS))]
    try:
        for proc in procs:
            proc.start()
        got = {}
        deadline = time.monotonic() + TIMEOUT_S - 10
        while len(got) < len(MEMBERS):
            try:
                island, links = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"islands {sorted(set(MEMBERS) - set(got))} never answered")
            assert isinstance(links, dict), links
            got[island] = links
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    for island, links in got.items():
        assert set(links) == set(MEMBERS) - {island}
        assert all(throughput > 0 and rtt >= 0 for throughput, rtt in links.values())
