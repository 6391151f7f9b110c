"""The island's side of the run's protocol, as the outer step uses it: one home for every exchange.

`MeshMember` is what `atoll.sync` calls at outer boundaries: `barrier`, `outcome`, `next_epoch`,
`epoch_named`, `dissolved`; and, while a joiner is not yet admitted, `admit` and `post_ready`. Local rank 0 (the leader) asks the coordinator; it hands the answer to
the island's other local ranks over the island's control group (a gloo group with a long timeout:
they wait as long as the leader waits), so every local rank of an island moves as one.

Failure semantics: see `atoll.mesh.client` (retries through blips, pauses and restarts of the
coordinator; waits end when the coordinator decides). An expected failure on the leader (lost
coordinator, dropped, refused) is relayed to the other local ranks with the answer they wait for
(`from_leader`), so every rank of the island raises it alike and the island ends as one, with one
line and its exit code; a leader that raises anything else makes the other ranks fail at their
next control-group collective.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from atoll import logs
from atoll.comm.allreduce import ABANDONED
from atoll.config import MeshConfig
from atoll.errors import ExpectedFailure, say
from atoll.island import Island, broadcast_ints
from atoll.mesh.auth import epoch_key, run_token
from atoll.mesh.client import CoordinatorClient, Heartbeat, log_waiting, new_incarnation, refused, register, wait_for_admission
from atoll.mesh.link_probe import BackgroundProbe
from atoll.mesh.membership import Epoch
from atoll.mesh.ring_order import Link

ABORT, COMMIT, RESYNC = 0, 1, 2
NOT_ADMITTED = -1
"""The epoch number of a joiner that is not a member of any epoch yet."""
OUTCOMES = {"abort": ABORT, "commit": COMMIT, "resync": RESYNC}
PROBE_POLL_S = 0.5
"""How often `report_links` looks whether the epoch it waits on was dissolved."""


@dataclass(frozen=True)
class Outcome:
    """The coordinator's word on one attempt at an outer step."""

    kind: int
    """ABORT, COMMIT or RESYNC."""
    next_epoch: int
    """The epoch to be in afterwards (a commit may admit joiners)."""
    source: int
    """With RESYNC: the member whose outer state everyone takes."""


@dataclass
class MeshMember:
    """This process's place in the run: island id, incarnation, the current epoch, and (on local
    rank 0) the coordinator client and heartbeat."""

    island_id: str
    incarnation: str
    epoch: Epoch
    island: Island
    client: CoordinatorClient
    """Local rank 0's talks to the coordinator; the other ranks' only asks `latest`."""
    heartbeat: Heartbeat | None
    log: Callable[[str], None] = logs.info
    fetch: dict[str, Any] | None = None
    """While not admitted: the coordinator's word on where to fetch the run's state ({"step",
    "sources": [{"island", "host", "ports"}]})."""
    numbers: dict[str, float] = field(default_factory=dict)
    """The latest metrics record's few numbers (`atoll.mesh.status.island_numbers`), sent with
    each outer step's boundary barrier for the coordinator's status page."""

    @property
    def index(self) -> int:
        """This island's rank among the epoch's islands."""
        return self.epoch.index_of(self.island_id)

    @property
    def world(self) -> int:
        """Islands in the epoch."""
        return self.epoch.world

    def epoch_key(self) -> bytes:
        """The key of the current epoch's ring payloads (see `atoll.mesh.auth`)."""
        return epoch_key(self.client.key, self.epoch.number, self.epoch.members, self.epoch.incarnations)

    def barrier(self, name: str) -> bool:
        """True when every member of the epoch reached barrier `name`; False if the epoch was
        dissolved first (a member died, hung or left). Unbounded while the peers are alive."""
        def ask() -> bool:
            args = {"epoch": self.epoch.number, "name": name, **({"numbers": self.numbers} if name.startswith("outer-") else {})}
            answer = self.client.wait("barrier", args, f"the other islands at {name}", self.log)
            return "passed" in answer

        return from_leader(self.island, ask)

    def outcome(self, outer_step: int, round_: int, ok: bool, digest: str, error: str, blamed: str | None) -> Outcome:
        """Report a failure (if any), post this island's result and wait for the step's outcome."""
        def ask() -> list[int]:
            number = self.epoch.number
            if not ok:
                abandoned = ABANDONED in error
                self.client.call("report", {"epoch": number, "what": error or "a local rank's collective failed", "blamed": blamed, "abandoned": abandoned})
            answer = self.client.wait(
                "result", {"epoch": number, "step": outer_step, "round": round_, "ok": ok, "digest": digest},
                f"the outcome of outer step {outer_step}", self.log,
            )
            return [OUTCOMES[answer["outcome"]], int(answer["next"]), int(answer["source"])]

        return Outcome(*from_leader(self.island, ask))

    def admit(self) -> None:
        """Wait for admission: either an epoch has this process (`epoch` is set, `fetch` None), or
        the run has started and the coordinator says where to fetch its state (`fetch` is set)."""
        def ask() -> dict[str, Any]:
            answer = wait_for_admission(self.client, NOT_ADMITTED, self.log)
            return {"epoch": answer.to_dict()} if isinstance(answer, Epoch) else {"fetch": answer}

        answer = from_leader(self.island, ask)
        self.fetch = answer.get("fetch")
        if "epoch" in answer:
            self.epoch = Epoch.from_dict(answer["epoch"])

    def post_ready(self, step: int) -> bool:
        """Tell the coordinator this joiner holds the state of outer step `step` (-1: none, it takes
        it by broadcast on entering); False if that state is stale (a step was committed since)."""
        return from_leader(self.island, lambda: "stale" not in self.client.call("ready", {"step": step}))

    def measure_links(self, groups: list[dist.ProcessGroup], ring_order: str) -> None:
        """Under `comm.ring_order = "measured"`, with 3 or more islands (2 have one ring), measure
        this island's links to the epoch's other members on local rank 0's first global group
        (`atoll.mesh.link_probe`; every member's rank 0 does, right after entering) and report them
        to the coordinator, which orders the next epochs by them: `measure_links_behind`, then
        `report_links`, whose doc says what a dead, silent or dissolved peer does."""
        if (probe := self.measure_links_behind(groups, ring_order)) is not None:
            self.report_links(probe)

    def measure_links_behind(self, groups: list[dist.ProcessGroup], ring_order: str) -> BackgroundProbe | None:
        """`measure_links`' measurement started in a background thread (None where it does not
        apply); `report_links` waits for it and reports. Every member must start it at the same
        point (on entering an epoch, or after the same committed outer step), as the probes pair up."""
        if ring_order != "measured" or not self.island.is_leader or self.epoch.world < 3:
            return None
        return BackgroundProbe(groups[0], self.epoch.members, self.index, self.epoch.number)

    def report_links(self, probe: BackgroundProbe) -> None:
        """Wait for a measurement and report its links. A dead or silent peer (RuntimeError at the
        probe's deadline) is logged and nothing is reported: the epoch's next collective fails as it
        would have. Waits no longer once the epoch is dissolved (the probe ends at its own deadline
        on groups nobody uses any more). The report retries like every request (`atoll.mesh.client`)."""
        while probe.thread.is_alive():
            probe.thread.join(PROBE_POLL_S)
            if probe.thread.is_alive() and self.dissolved(probe.epoch):
                self.log(f"atoll: measuring the links of epoch {probe.epoch} abandoned: the epoch was dissolved")
                return
        if probe.links is None:
            self.log(f"atoll: measuring the links of epoch {probe.epoch} failed: {probe.error}")
            return
        self._report_links(probe.links)

    def _report_links(self, links: dict[str, Link]) -> None:
        """Send measured links to the coordinator (which orders the next epochs by them) and log the slowest."""
        self.client.call("links", {"links": {peer: link.to_dict() for peer, link in links.items()}})
        slowest = min(links.items(), key=lambda item: item[1].throughput)
        self.log(f"atoll: links of epoch {self.epoch.number} measured; slowest to {slowest[0]!r}: "
                 f"{slowest[1].throughput * 8 / 1e6:.1f} Mbit/s, rtt {slowest[1].rtt * 1e3:.1f} ms")

    def report_failure(self, what: str) -> None:
        """Tell the coordinator that entering the current epoch failed here (local rank 0; no
        collective: a rank may call it alone)."""
        if self.island.is_leader:
            self.client.call("report", {"epoch": self.epoch.number, "what": what, "blamed": None})

    def next_epoch(self) -> int:
        """Wait until the current epoch is dissolved; the newest epoch's number."""
        return from_leader(self.island, lambda: int(self.client.wait("next_epoch", {"epoch": self.epoch.number}, "the next epoch", self.log)["next"]))

    def epoch_named(self, number: int) -> Epoch:
        """Epoch `number` as the coordinator published it, on every local rank."""
        return Epoch.from_dict(from_leader(self.island, lambda: self.client.call("epoch", {"number": number})["epoch"]))

    def dissolved(self, number: int) -> bool:
        """Whether epoch `number` has been replaced (the leader reads its heartbeat's news)."""
        if self.heartbeat is not None:
            return self.heartbeat.latest > number
        return int(self.client.call("latest", {})["latest"]) > number

    def leave(self, reason: str) -> None:
        """Stop heartbeating and send the deathrattle (local rank 0; a no-op elsewhere).

        Best effort: if the coordinator is unreachable there is nobody left to tell.
        """
        if self.heartbeat is None:
            return
        try:  # the deathrattle first: closing the control connection alone would read as a crash
            self.client.retry_s = 2.0
            self.client.call("leave", {"reason": reason})
        except Exception:  # noqa: BLE001 - a deathrattle never masks why the island is leaving
            pass
        self.heartbeat.stop()


def from_leader(island: Island, ask: Callable[[], Any]) -> Any:
    """Local rank 0's `ask()` (a JSON value) on every local rank, over the control group (the other
    ranks wait as long as the leader does). An ExpectedFailure on the leader is raised on every
    rank alike, so the island ends as one (with one line: the CLI prints it on local rank 0)."""
    said = ""
    if island.is_leader:
        try:
            said = json.dumps({"answer": ask()})
        except ExpectedFailure as err:
            say(err)  # before the other ranks end, and torchrun with them ends this one
            if island.world > 1:
                _broadcast_text(json.dumps({"failure": str(err), "code": err.exit_code}), island)
            raise
    said = json.loads(_broadcast_text(said, island))
    if "failure" in said:
        raise ExpectedFailure(said["failure"], said["code"])
    return said["answer"]


def _broadcast_text(text: str, island: Island) -> str:
    """Local rank 0's text on every local rank, over the control group."""
    if island.world == 1:
        return text
    length = broadcast_ints([len(text.encode())], island)[0]
    payload = torch.zeros(length, dtype=torch.uint8)
    if island.is_leader:
        payload.copy_(torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8))
    dist.broadcast(payload, src=0, group=island.control)
    return bytes(payload.tolist()).decode()




def preflight(cfg: MeshConfig, island_id: str, island: Island) -> None:
    """Before the island spends minutes on its data and model: reach the coordinator (saying at
    once what it waits for and until when; a UserError after mesh.connect_timeout_s), check the
    token, and ask whether a live process holds this island id (a UserError, DUPLICATE). On
    local rank 0 for the island; the registration after the model is built checks again."""
    def ask() -> bool:
        probe = CoordinatorClient(
            cfg.coordinator, island_id, new_incarnation(), run_token(cfg.token), min(cfg.connect_timeout_s, cfg.join_timeout_s),
            cfg.coordinator_retry_s, "preflight",
        )
        try:
            refused(probe, probe.call("preflight", {}))
        finally:
            probe.close()
        return True

    from_leader(island, ask)


def join_mesh(
    cfg: MeshConfig, island_id: str, island: Island, fingerprint: dict[str, Any], log: Callable[[str], None],
    serve_ports: list[int] | None = None, serve_host: str = "",
) -> MeshMember:
    """Connect, register (with where each local rank serves the state: `serve_ports`, local rank
    0's list, on `serve_host`) and heartbeat (local rank 0), and wait until an epoch has this island
    or, if the run has started, until the coordinator says where to fetch its state (`fetch`).

    `mesh.join_timeout_s` bounds reaching the coordinator and registering; the wait for admission
    to the run's start is unbounded while the run lives.
    """
    token = run_token(cfg.token)
    incarnation = _broadcast_text(new_incarnation() if island.is_leader else "", island)
    channel = "main" if island.is_leader else f"rank{island.rank}"
    client = CoordinatorClient(
        cfg.coordinator, island_id, incarnation, token, min(cfg.connect_timeout_s, cfg.join_timeout_s), cfg.coordinator_retry_s, channel,
        log_waiting if island.is_leader else lambda line: None,  # the leader speaks for the island
    )
    heartbeat = None

    def enrol() -> bool:
        nonlocal heartbeat
        register(client, island.world, fingerprint, {"host": serve_host, "ports": serve_ports} if serve_ports else None)
        beat = CoordinatorClient(cfg.coordinator, island_id, incarnation, token, cfg.connect_timeout_s, cfg.coordinator_retry_s, "beat")
        heartbeat = Heartbeat(beat, cfg.heartbeat_interval_s)
        return True

    from_leader(island, enrol)  # a refusal ends every local rank alike
    member = MeshMember(island_id, incarnation, Epoch(NOT_ADMITTED, (), island.world), island, client, heartbeat, log)
    member.admit()
    return member
