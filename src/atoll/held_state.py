"""What an island holds of the run, and how it serves it to joiners.

The run's state is the outer weights and momentum (`atoll.diloco.DiLoCo`) of the last committed
outer step, with the progress that goes with them: the outer step, the inner step and the
run-wide sample cursor (`TrainState`). `HeldState` keeps them together with `has_state`
(False for a joiner until it fetched or received them) and this rank's state server
(`atoll.comm.transfer.ServedState`): every change of the outer state goes through `changing()`,
which withdraws what the server serves while the buffers change and serves the new version
after, so a joiner never receives a half-applied step (its fetch fails and it fetches again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from atoll.comm.transfer import ServedState
from atoll.diloco import DiLoCo

if TYPE_CHECKING:
    from atoll.train_state import TrainState


class HeldState:
    """One local rank's hold on the run's state (`diloco` None: ddp, or an island alone)."""

    def __init__(self, diloco: DiLoCo | None, progress: TrainState, served: ServedState | None, has_state: bool) -> None:
        self.diloco = diloco
        self.progress = progress
        """Inner step, tokens and the run-wide sample cursor (identical on every local rank)."""
        self.outer_steps = 0
        """Outer steps committed or skipped: the version of the outer state."""
        self.has_state = has_state
        """Whether this island holds the run's state (epoch 0's islands do; a joiner once it fetched it)."""
        self.served = served

    def table_row(self) -> list[int]:
        """(holds the state?, outer step, inner step, sample cursor): what members compare on entering an epoch."""
        return [int(self.has_state), self.outer_steps, self.progress.step, self.progress.samples]

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Change the outer state (and `outer_steps`) with this rank's state server withdrawn, then serve the new version."""
        if self.served is None:
            yield
            return
        with self.served.changing():
            yield
        self.publish()

    def publish(self) -> None:
        """Serve this rank's outer state as of `outer_steps` (when it holds the run's state)."""
        if self.served is not None and self.diloco is not None and self.has_state:
            self.served.publish(self.outer_steps, self.diloco.served_buffers(), self.progress.step, self.progress.samples)
