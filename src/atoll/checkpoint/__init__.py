"""Checkpoints: sharded, atomic saves of everything a run needs to resume exactly."""

from atoll.checkpoint.sharded import Checkpointer, ModelOptimizerState

__all__ = ["Checkpointer", "ModelOptimizerState"]
