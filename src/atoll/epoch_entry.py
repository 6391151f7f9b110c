"""Entering an epoch: the barrier, the epoch's global groups, and the run's state shared among its members.

Every change of membership makes a new epoch; its members enter it by barrier "enter", build its
global groups (a new store prefix; the old groups are dropped), then every member says whether
it holds the run's state and at which outer step; if one does not, or holds an older one (an
island resumed from an older checkpoint, a joiner whose fetch failed), the holder with the most
progress broadcasts the outer weights, the outer momentum and the progress (inner step, outer
step, run-wide sample cursor) over the new global group, raw tensors only; a joiner that fetched
the state receives only the progress (three integers). An epoch in which nobody holds the state
after the run has started stops with one line: it never silently restarts the run from the
initial weights. The joiner's inner weights become the outer weights, and its AdamW starts
fresh: the inner optimizer's state is each island's own in DiLoCo (islands' AdamW states differ
anyway), and sending it would triple the transfer.

Epochs are entered only where no all-reduce is in flight (`atoll.outer_step`): at a boundary
barrier, or when an outer step's outcome ends the epoch, after the all-reduce has landed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch

from atoll import errors
from atoll.comm.allreduce import GlobalMean, WireStats
from atoll.comm.codecs import get_codec
from atoll.config import JobConfig
from atoll.errors import ExpectedFailure
from atoll.held_state import HeldState
from atoll.island import Island, all_ranks_ok
from atoll.mesh.groups import global_groups, gloo_device
from atoll.mesh.member import MeshMember
from atoll.mesh.rendezvous import EpochStore


class EpochEntry:
    """Moves one local rank into the member's epochs; `mean` averages over the current one's groups."""

    def __init__(self, cfg: JobConfig, member: MeshMember, island: Island, held: HeldState, notes: list[str], wire: WireStats) -> None:
        self.cfg = cfg
        self.member = member
        self.island = island
        self.held = held
        self.notes = notes
        self.wire = wire
        """Shared by the GlobalMeans of successive epochs, so the byte counts stay cumulative."""
        self.mean: GlobalMean | None = None

    def enter(self, number: int) -> None:
        """Move to epoch `number` (or a newer one, if it fails too): barrier, groups, state.

        A failure while entering (a peer dead or silent past mesh.collective_timeout_s, a group
        that cannot form) is reported to the coordinator and the next epoch is tried. Raises
        ExpectedFailure if this island is not a member (DROPPED: the coordinator dropped it,
        e.g. after it hung past the heartbeat timeout): it must be restarted to join again; and
        after mesh.enter_attempts epochs in a row that could not be entered (CANNOT_ENTER).
        """
        for _ in range(self.cfg.mesh.enter_attempts):
            tried, epoch = number, self.member.epoch_named(number)
            if not epoch.has(self.member.island_id, self.member.incarnation):
                raise ExpectedFailure(
                    f"island {self.member.island_id!r} was dropped from the run in epoch {number} ({epoch.reason}); "
                    "restart it to join again", errors.DROPPED,
                )
            previous, self.member.epoch = self.member.epoch, epoch
            if previous.number != number:
                self.notes.append(f"epoch {number}: {epoch.world} islands {list(epoch.members)} ({epoch.reason})")
            if not self.member.barrier("enter"):
                number = self.member.next_epoch()
                continue
            error = ""
            try:
                self.mean = self._groups(epoch.number)
                self._share_state()
                self.member.measure_links(self.mean.groups, self.cfg.comm.ring_order)  # the next epochs' ring order
            except RuntimeError as err:
                error = str(err).splitlines()[0]
            if all_ranks_ok(not error, self.island):
                return
            self.member.report_failure(error or "a local rank could not enter the epoch")
            number = self.member.next_epoch()
        raise ExpectedFailure(
            f"could not enter an epoch in {self.cfg.mesh.enter_attempts} attempts in a row (mesh.enter_attempts); last: epoch "
            f"{tried}; see membership.jsonl for who failed", errors.CANNOT_ENTER,
        )

    def _groups(self, number: int) -> GlobalMean:
        """The epoch's global groups (comm.streams per local rank) behind one GlobalMean; raises RuntimeError
        when a peer does not rendezvous within mesh.collective_timeout_s."""
        timeout = self.cfg.mesh.collective_timeout_s
        rendezvous: Callable[[str], EpochStore] = lambda prefix: EpochStore(
            self.member.client, number, prefix, timedelta(seconds=timeout)
        )
        groups = global_groups(
            rendezvous, self.member.epoch, self.member.island_id, self.island.rank, self.cfg.comm.streams,
            timedelta(seconds=timeout), lambda: gloo_device(self.cfg.mesh),
        )
        return GlobalMean(
            groups, get_codec(self.cfg.comm.codec, self.cfg.comm.topk_density, self.cfg.comm.topk_bits), timeout, int(self.cfg.comm.chunk_mb * 1e6), self.wire,
            abandoned=lambda: self.member.dissolved(number), key=self.member.epoch_key(),
        )

    def _share_state(self) -> None:
        """Every member ends with the newest state any member holds (raw tensors over the group,
        MAC-checked: `GlobalMean.all_gather` and `broadcast_`).

        Members share (holds the run's state?, outer step, inner step, sample cursor). The source
        is the holder with the most progress (lowest index on a tie); members that do not hold the
        state or hold one of an older outer step (an island resumed from an older checkpoint, a
        joiner whose fetch failed) receive its outer weights and momentum; members whose progress
        differs receive the progress. A joiner that fetched the state of the current outer step
        thus receives three integers; a whole run resumed from checkpoints continues from the
        newest of them. An epoch in which nobody holds the state after the run has started raises.
        A dead or silent peer raises RuntimeError (gloo, or RingError on a MAC that does not verify).
        """
        held, progress = self.held, self.held.progress
        table = [tuple(int(v) for v in row.tolist()) for row in self.mean.all_gather(torch.tensor(held.table_row(), dtype=torch.int64))]
        holders = [i for i, (holds, *_) in enumerate(table) if holds]
        if not holders:
            raise RuntimeError(
                f"no island of epoch {self.member.epoch.number} holds the run's state (every holder is gone): "
                "restart the islands with --resume to continue from their newest checkpoints"
            )
        source = max(holders, key=lambda i: (table[i][1], table[i][2], -i))
        if all(row == table[source] for row in table):
            return
        if held.diloco is None:
            raise RuntimeError("ddp mode has a fixed membership and cannot admit joiners")
        received = torch.tensor([progress.step, held.outer_steps, progress.samples], dtype=torch.int64)
        self.mean.broadcast_([received], source)
        whole = any(not holds or outer != table[source][1] for holds, outer, *_ in table)
        if whole:
            with held.changing():
                held.diloco.broadcast_state(self.mean, source)
        if (progress.step, held.outer_steps, progress.samples) != tuple(int(v) for v in received.tolist()):
            progress.step, held.outer_steps, progress.samples = (int(v) for v in received.tolist())
            what = "state (weights and momentum by broadcast)" if whole else "progress"
            self.notes.append(
                f"took the run's {what} at inner step {progress.step}, outer step {held.outer_steps} "
                f"from island {self.member.epoch.members[source]!r}"
            )
        held.has_state = True
