"""The store-key protocol between islands and the coordinator.

The coordinator hosts a torch `TCPStore`; islands are its clients. Keys:

    atoll/registrations          appended "<island_id>," by each island leader as it arrives
    atoll/island/<id>            the island's Registration (JSON), written before the append
    atoll/epoch/latest           number of the newest epoch (decimal text); absent before epoch 0
    atoll/epoch/<n>              Epoch <n> (JSON)
    atoll/epoch/<n>/error        why epoch <n> could not form (text); islands waiting for it exit
    atoll/epoch/<n>/pg/<k>/<s>/  the store namespace of epoch <n>'s global group for local rank k,
                                 stream s (comm.streams rings per local rank)
    atoll/island/<id>/refused    why the coordinator refuses island <id> (text); it exits
    atoll/ended                  why the run is over (every member left); joiners exit
    atoll/heartbeat/<id>         a counter the island's leader adds 1 to every heartbeat interval
    atoll/leaving/<id>           the island's deathrattle: why it is leaving (text); deleted when
                                 the same id registers again
    atoll/epoch/<n>/next         number of the epoch that replaced epoch <n> (it is dissolved)
    atoll/epoch/<n>/barrier/<b>  a counter: members of epoch <n> that reached barrier <b>
                                 ("enter", "outer-<s>")
    atoll/epoch/<n>/failed/<id>  island <id>'s report that a global collective of epoch <n> failed
    atoll/epoch/<n>/result/<id>  island <id>'s latest StepResult in epoch <n> ("<s> ok <digest>")
    atoll/epoch/<n>/outcome/<s>  the outcome of outer step <s> in epoch <n>, set once with
                                 compare_set: "commit <next epoch>", "diverged" or "abort"

Writers: only the coordinator writes epoch keys, except that an island that finds epoch <n>
dissolved sets a missing outcome to "abort" (compare_set makes the first writer win, so every
island reads the same outcome); only an island's local rank 0 writes its own island, heartbeat,
leaving, barrier, failed and result keys. Nothing read from the store is unpickled: values are
JSON or text.
"""

from __future__ import annotations

PREFIX = "atoll/"
REGISTRATIONS = PREFIX + "registrations"
LATEST_EPOCH = PREFIX + "epoch/latest"
ENDED = PREFIX + "ended"


def island_key(island_id: str) -> str:
    return f"{PREFIX}island/{island_id}"


def epoch_key(number: int) -> str:
    return f"{PREFIX}epoch/{number}"


def epoch_error_key(number: int) -> str:
    return f"{PREFIX}epoch/{number}/error"


def group_prefix(epoch: int, local_rank: int, stream: int) -> str:
    return f"{PREFIX}epoch/{epoch}/pg/{local_rank}/{stream}/"


def refused_key(island_id: str) -> str:
    return f"{PREFIX}island/{island_id}/refused"


def heartbeat_key(island_id: str) -> str:
    return f"{PREFIX}heartbeat/{island_id}"


def leaving_key(island_id: str) -> str:
    return f"{PREFIX}leaving/{island_id}"


def next_epoch_key(number: int) -> str:
    return f"{PREFIX}epoch/{number}/next"


def barrier_key(number: int, name: str) -> str:
    return f"{PREFIX}epoch/{number}/barrier/{name}"


def failed_key(number: int, island_id: str) -> str:
    return f"{PREFIX}epoch/{number}/failed/{island_id}"


def result_key(number: int, island_id: str) -> str:
    return f"{PREFIX}epoch/{number}/result/{island_id}"


def outcome_key(number: int, outer_step: int) -> str:
    return f"{PREFIX}epoch/{number}/outcome/{outer_step}"
