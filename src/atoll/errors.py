"""Expected failures and their exit codes: one place for every way atoll ends on purpose.

An `ExpectedFailure` is how a run ends when something outside the code went wrong in a way we
foresaw (a user's input, a lost coordinator, being dropped by the run). The CLI prints its
message as a single line and exits with its `exit_code`, with no traceback (`--debug` shows it);
every other exception is a bug and keeps its traceback. The README lists these codes.
"""

from __future__ import annotations

import os
import sys

DEBUG_ENV = "ATOLL_DEBUG"
"""Set (by `atoll --debug`, and inherited by every rank) to print expected failures' tracebacks too."""
TORCHRUN_RANK_ENV = "RANK"
"""atoll.island.RANK_ENV, read here without importing torch."""

USER_ERROR = 2
"""Bad input: a config key, a flag, a file, a coordinator address, the run token."""
LOST_COORDINATOR = 3
"""The coordinator stopped answering mid-run for longer than mesh.coordinator_retry_s."""
DROPPED = 4
"""The run dropped this island (it hung past the heartbeat timeout, or was evicted): restart it."""
SKIPPED_STEPS = 5
"""mesh.max_skipped_in_a_row outer steps in a row could not be averaged."""
RUN_ENDED = 6
"""The run ended before this island joined it."""
CANNOT_ENTER = 7
"""mesh.enter_attempts epochs in a row could not be entered."""
DUPLICATE = 8
"""Refused: a live process of the run already uses this island id."""
CONFIG_MISMATCH = 9
"""Refused: this island's job (config, shape) differs from the run's."""

EXIT_CODES = {
    USER_ERROR: "user error (bad input)",
    LOST_COORDINATOR: "lost the coordinator",
    DROPPED: "dropped by the run",
    SKIPPED_STEPS: "too many skipped outer steps",
    RUN_ENDED: "the run ended before joining",
    CANNOT_ENTER: "cannot enter an epoch",
    DUPLICATE: "refused as a duplicate island id",
    CONFIG_MISMATCH: "refused: mismatched config",
}


class ExpectedFailure(Exception):
    """A foreseen way for a run to end: one line (the message says what and what to do) and an exit code."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        self.said = False


class UserError(ExpectedFailure):
    """An error caused by the user's input; the message names the input and the fix."""

    exit_code = USER_ERROR


def say(err: ExpectedFailure) -> None:
    """Print the failure's one line, once, as soon as it is known (before any clean-up: a rank of
    an island can be ended by torchrun once another rank has failed). Only local rank 0 says it:
    an island's ranks fail alike (`atoll.mesh.member.from_leader`)."""
    if not err.said and os.environ.get(TORCHRUN_RANK_ENV, "0") == "0":
        print(f"atoll: error: {err}", file=sys.stderr, flush=True)
    err.said = True
