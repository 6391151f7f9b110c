"""Checkpoints: complete, asynchronous, verified saves of everything an island needs to resume.

`sharded` (the Checkpointer: staging, background DCP writes, atomic publish, loading), `manifest`
(the JSON manifest and its sha256 verification), `timeline` (histories, `latest`, retention),
`rundir` (the run-directory lock, refusing a fresh run in a used directory), `remote`
(copies through fsspec) and `reader` (a checkpoint's model tensor by tensor, for export, eval and
sample; imported from there, as it needs atoll.model).
"""

from atoll.checkpoint.manifest import CorruptCheckpoint, Manifest, read_manifest, verify
from atoll.checkpoint.rundir import RunDirLock, check_fresh_run_dir
from atoll.checkpoint.sharded import Checkpointer, ModelOptimizerState, Resumable, SaveReport, newest_verified

__all__ = [
    "Checkpointer",
    "CorruptCheckpoint",
    "Manifest",
    "ModelOptimizerState",
    "Resumable",
    "RunDirLock",
    "SaveReport",
    "check_fresh_run_dir",
    "newest_verified",
    "read_manifest",
    "verify",
]
