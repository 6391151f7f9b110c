"""The store-key protocol between islands and the coordinator.

The coordinator hosts a torch `TCPStore`; islands are its clients. Keys:

    atoll/registrations          appended "<island_id>," by each island leader as it arrives
    atoll/island/<id>            the island's Registration (JSON), written before the append
    atoll/epoch/latest           number of the newest epoch (decimal text); absent before epoch 0
    atoll/epoch/<n>              Epoch <n> (JSON)
    atoll/epoch/<n>/error        why epoch <n> could not form (text); islands waiting for it exit
    atoll/epoch/<n>/pg/<k>/<s>/  the store namespace of epoch <n>'s global group for local rank k,
                                 stream s (comm.streams rings per local rank)

Writers: only the coordinator writes epoch keys; only an island's local rank 0 writes its own
island key. Nothing read from the store is unpickled: values are JSON or decimal text.
"""

from __future__ import annotations

PREFIX = "atoll/"
REGISTRATIONS = PREFIX + "registrations"
LATEST_EPOCH = PREFIX + "epoch/latest"


def island_key(island_id: str) -> str:
    return f"{PREFIX}island/{island_id}"


def epoch_key(number: int) -> str:
    return f"{PREFIX}epoch/{number}"


def epoch_error_key(number: int) -> str:
    return f"{PREFIX}epoch/{number}/error"


def group_prefix(epoch: int, local_rank: int, stream: int) -> str:
    return f"{PREFIX}epoch/{epoch}/pg/{local_rank}/{stream}/"
