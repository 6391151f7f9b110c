"""Atomic writes keep the umask's modes: what atoll writes is as readable as what the user writes."""

from __future__ import annotations

import os
import stat

from atoll.atomic import PRIVATE_MODE, atomic_write, temp_dir_beside, umask_mode
from atoll.config import JobConfig, dump_config


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_temp_dirs_get_the_umasks_mode_and_secrets_stay_private(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "shared.json", lambda f: f.write(b"{}"))
        atomic_write(tmp_path / "secret", lambda f: f.write(b"x"), PRIVATE_MODE)
        made = temp_dir_beside(tmp_path / "out", ".partial")
        dump_config(JobConfig(), tmp_path / "config.toml")
        assert umask_mode() == 0o640 and umask_mode(0o777) == 0o750
        dump_config(JobConfig.model_validate({"mesh": {"token": "s3cret"}}), tmp_path / "with-token.toml")
    finally:
        os.umask(old)
    assert mode(tmp_path / "shared.json") == 0o640 and mode(tmp_path / "config.toml") == 0o640
    assert mode(tmp_path / "secret") == 0o600 and mode(tmp_path / "with-token.toml") == 0o600
    assert mode(made) == 0o750 and made.name.startswith(".out.") and made.name.endswith(".partial")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
