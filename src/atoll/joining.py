"""How a joiner gets the run's state before it is admitted.

The joiner has built its model before it registered. The coordinator tells it where the members
serve their state; it fetches the outer weights, momentum and progress of the last committed
outer step from all of them at once, in the background of their training
(`atoll.comm.transfer`: chunked, sha256-checked, token holders only), tells the coordinator it
is ready, and is admitted when a member reaches the next boundary barrier (`atoll.epoch_entry`
then enters the new epoch). A fetch that fails `mesh.transfer_attempts` times falls back to a
broadcast on entering.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from atoll.comm.transfer import Source, TransferError, fetch_state
from atoll.held_state import HeldState
from atoll.island import Island, all_ranks_ok, broadcast_ints
from atoll.mesh.member import MeshMember

FETCH_RETRY_S = 0.2
"""A joiner's pause before it fetches again after a failed fetch: long enough for the sources to
finish applying an outer step (they withdraw their state for the milliseconds that takes), short
against an inner phase, whose commit would make the next fetch stale."""


def fetch_until_admitted(member: MeshMember, transfer_attempts: int, fetch: Callable[[dict[str, Any]], int]) -> None:
    """A joiner's way in: `fetch` the state where the coordinator says (the outer step it got, or
    -1), say it is ready, wait for admission; again while the state it fetched goes stale (a step
    was committed meanwhile). A failed fetch (say, every source was applying an outer step and
    withdrew its state) is tried again after FETCH_RETRY_S, with the sources the coordinator names
    then. After `transfer_attempts` fetches that failed or went stale it says it is ready without
    a state and takes it by broadcast on entering. Waits for admission are unbounded while the run
    lives; a lost coordinator raises from `member` as everywhere."""
    attempts = 0
    while member.fetch is not None:
        step = -1
        if attempts < transfer_attempts:
            attempts += 1
            step = fetch(member.fetch)
            if step < 0 and attempts < transfer_attempts:
                time.sleep(FETCH_RETRY_S)
                member.admit()  # answered at once: where to fetch now
                continue
        member.post_ready(step)
        member.admit()  # admitted; or, the state being stale, where to fetch now


def fetch_run_state(where: dict[str, Any], held: HeldState, member: MeshMember, island: Island, timeout_s: float, notes: list[str]) -> int:
    """Every local rank fetches its shard of the state from the same local rank of every source
    (`atoll.comm.transfer.fetch_state`: a dead or silent source is dropped and its chunks are
    asked of the others, each connection bounded by `timeout_s`); returns the outer step it is
    of, or -1 if any rank failed or the ranks got different versions (the buffers are then not
    used: `has_state` stays False, and the caller fetches again or falls back to a broadcast)."""
    sources = [Source(s["island"], s["host"], int(s["ports"][island.rank])) for s in where["sources"]]
    version, report, error = -1, None, "no island serves the state"
    if sources:
        try:
            report = fetch_state(sources, member.client.key, member.island_id, held.diloco.transfer_buffers(), timeout_s)
            version = report.manifest.version
        except TransferError as err:
            error = str(err)
    leader_version = broadcast_ints([version], island)[0]
    if not all_ranks_ok(version >= 0 and version == leader_version, island):
        notes.append(f"fetching the run's state failed: {error if report is None else 'another local rank failed'}")
        held.has_state = False  # the buffers are partly overwritten
        return -1
    manifest = report.manifest
    held.diloco.took_state(any(name == "momentum" for name, _ in manifest.tensors))
    held.has_state, held.outer_steps = True, manifest.version
    held.progress.step, held.progress.samples = manifest.step, manifest.samples
    notes.append(report.describe())
    return version
