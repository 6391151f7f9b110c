"""Checkpoints in one process: every piece round-trips, manifests verify, timelines keep what a
rollback came from, remote copies through fsspec (memory and local filesystems)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import numpy as np
import pytest
import torch
import torch.distributed as dist

from atoll.checkpoint import Checkpointer, CorruptCheckpoint, ModelOptimizerState, newest_verified, read_manifest, verify
from atoll.checkpoint import remote
from atoll.checkpoint.rundir import RunDirLock, check_fresh_run_dir
from atoll.checkpoint.timeline import Timeline, checkpoint_name, lineage, save_registry
from atoll.data import PackedLoader
from atoll.diloco import DiLoCo
from atoll.errors import UserError
from atoll.launch import default_run_dir
from atoll.train_state import OuterProgress, RankState, TrainState, checkpoint_facts


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """DCP and the checkpointer's writer group need a (one-process) default group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def outer_stepped(model: torch.nn.Module) -> DiLoCo:
    """A DiLoCo that has taken two outer steps, so it has a momentum buffer."""
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    for k in range(2):
        diloco.pseudo_grad.copy_(torch.linspace(-1, 1, diloco.outer.numel()) * (k + 1))
        diloco.apply()
    return diloco


def island_state(seed: int) -> dict:
    """Every piece an island's checkpoint holds, in a fresh state built from `seed`."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = PackedLoader(np.arange(4000, dtype=np.int64) % 97, 16, 4, 0, 1, seed)
    sync = SimpleNamespace(outer_steps=0, diloco=DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True))
    train = TrainState()
    return {
        "model": model, "optimizer": optimizer, "loader": loader, "sync": sync, "train": train,
        "stateful": {
            "model_optimizer": ModelOptimizerState(model, optimizer),
            "train": train, "outer_progress": OuterProgress(sync), "rank0": RankState(loader, torch.device("cpu")),
            "diloco.rank0": sync.diloco,
        },
    }


def test_every_piece_of_an_island_round_trips_momentum_and_outer_step_included(tmp_path):
    saved = island_state(seed=1)
    model, optimizer = saved["model"], saved["optimizer"]
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    saved["sync"].diloco = outer_stepped(model)
    saved["stateful"]["diloco.rank0"] = saved["sync"].diloco
    saved["sync"].outer_steps = 7
    saved["train"].step, saved["train"].tokens, saved["train"].samples = 70, 4480, 280
    saved["loader"].batch_at(12)
    torch.manual_seed(123)
    checkpointer = Checkpointer(tmp_path, keep=2, is_leader=True)
    checkpointer.start(None)
    checkpointer.save(70, saved["stateful"], checkpoint_facts(saved["sync"], "ab" * 32))
    checkpointer.close()
    expected_rng = torch.get_rng_state()

    torch.manual_seed(999)
    loaded = island_state(seed=1)
    Checkpointer(tmp_path, keep=2, is_leader=True).load(tmp_path / "step-00000070", loaded["stateful"])

    for a, b in zip(saved["model"].parameters(), loaded["model"].parameters()):
        assert torch.equal(a, b)
    inner_saved, inner_loaded = saved["optimizer"].state_dict()["state"], loaded["optimizer"].state_dict()["state"]
    assert inner_loaded and all(torch.equal(inner_saved[k]["exp_avg_sq"], inner_loaded[k]["exp_avg_sq"]) for k in inner_saved)
    assert torch.equal(saved["sync"].diloco.outer, loaded["sync"].diloco.outer)
    momentum = loaded["sync"].diloco.optimizer.state[loaded["sync"].diloco.outer].get("momentum_buffer")
    assert momentum is not None, "outer momentum was lost"
    assert torch.equal(momentum, saved["sync"].diloco.optimizer.state[saved["sync"].diloco.outer]["momentum_buffer"])
    assert loaded["sync"].outer_steps == 7
    assert (loaded["train"].step, loaded["train"].tokens, loaded["train"].samples) == (70, 4480, 280)
    assert loaded["loader"].state_dict() == saved["loader"].state_dict()
    assert torch.equal(torch.get_rng_state(), expected_rng)
    manifest = verify(tmp_path / "step-00000070")
    assert (manifest.step, manifest.outer_step, manifest.epoch, manifest.members, manifest.outer_digest) == (70, 7, None, [], "ab" * 32)


def test_diloco_without_momentum_yet_loads_as_without_momentum(tmp_path):
    fresh = DiLoCo(small_model(), lr=0.7, momentum=0.9, nesterov=True)
    stepped = outer_stepped(small_model())
    checkpointer = Checkpointer(tmp_path, keep=2, is_leader=True)
    checkpointer.start(None)
    checkpointer.save(1, {"diloco": fresh})
    checkpointer.close()
    Checkpointer(tmp_path, keep=2, is_leader=True).load(tmp_path / "step-00000001", {"diloco": stepped})
    assert "momentum_buffer" not in stepped.optimizer.state[stepped.outer]
    assert torch.equal(stepped.outer, fresh.outer)


def saved_steps(directory: Path, steps: list[int], keep: int = 5, resumed_from: Path | None = None) -> Checkpointer:
    checkpointer = Checkpointer(directory, keep=keep, is_leader=True)
    checkpointer.start(resumed_from)
    for step in steps:
        checkpointer.save(step, {"w": {"t": torch.full((1000,), float(step))}})
    checkpointer.close()
    return checkpointer


def test_a_save_returns_before_the_copy_and_staged_waits_for_it_inner_state_first(tmp_path, monkeypatch):
    """save() returns while the copy to host memory is held; staged() lets it finish the inner
    state only, staged(everything=True) the outer state too; changes made after each wait never
    reach the checkpoint, and the waits count as blocked time."""
    from torch.distributed.checkpoint.staging import StateDictStager

    release, copied = threading.Event(), []
    original = StateDictStager.stage

    def held_stage(self, state_dict, **kwargs):
        assert release.wait(30), "the test never released the copy"
        copied.append(sorted(state_dict))
        return original(self, state_dict, **kwargs)

    monkeypatch.setattr(StateDictStager, "stage", held_stage)
    inner, outer = {"t": torch.full((1000,), 1.0)}, {"t": torch.full((1000,), 10.0)}
    checkpointer = Checkpointer(tmp_path, keep=2, is_leader=True)
    checkpointer.start(None)
    report = checkpointer.save(3, {"model": inner, "diloco.rank0": outer}, later={"diloco.rank0"})
    assert copied == [], "save() waited for the copy"
    release.set()
    waited = checkpointer.staged()
    assert copied[0] == ["model"]  # the inner state is copied first
    inner["t"].fill_(2.0)  # the optimizer step may change the weights now
    checkpointer.staged(everything=True)
    outer["t"].fill_(20.0)  # and the outer step the outer weights
    assert checkpointer.staged(everything=True) == 0.0  # nothing left to wait for
    checkpointer.wait()
    assert report.blocked_s >= waited and report.total_s >= report.blocked_s
    loaded = {"model": {"t": torch.zeros(1000)}, "diloco.rank0": {"t": torch.zeros(1000)}}
    Checkpointer(tmp_path, keep=2, is_leader=True).load(tmp_path / "step-00000003", loaded)
    assert bool((loaded["model"]["t"] == 1.0).all()) and bool((loaded["diloco.rank0"]["t"] == 10.0).all())


def test_flipped_bytes_then_a_truncated_file_in_latest_fall_back_with_one_line_each(tmp_path):
    saved_steps(tmp_path, [1, 2, 3])
    shard = tmp_path / "step-00000003" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size, one flipped bit
    shard.write_bytes(bytes(raw))
    lines: list[str] = []
    found = newest_verified(tmp_path, lines.append)
    assert found.path.name == "step-00000002" and len(lines) == 1
    assert "step-00000003" in lines[0] and "__0_0.distcp" in lines[0] and "sha256" in lines[0] and "\n" not in lines[0]

    metadata = tmp_path / "step-00000002" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-10])
    lines.clear()
    found = newest_verified(tmp_path, lines.append)
    assert found.path.name == "step-00000001" and len(lines) == 2
    assert ".metadata" in lines[1] and "truncated" in lines[1]
    state = {"w": {"t": torch.zeros(1000)}}
    Checkpointer(tmp_path, keep=5, is_leader=True).load(found.path, state)
    assert torch.equal(state["w"]["t"], torch.ones(1000))

    with pytest.raises(UserError, match="sha256"):
        Checkpointer(tmp_path, keep=5, is_leader=True).find_resumable(str(tmp_path / "step-00000003"), lines.append)


def test_rollback_starts_a_timeline_that_never_prunes_or_picks_what_it_came_from(tmp_path):
    saved_steps(tmp_path, [100, 200], keep=2)
    rollback = Checkpointer(tmp_path, keep=2, is_leader=True)
    rollback.start(tmp_path / "step-00000100")
    assert rollback.timeline == 1
    assert rollback.latest().name == "step-00000100"  # not the abandoned step 200, even before a save
    for step in (150, 200, 250, 300):
        rollback.save(step, {"w": {"t": torch.zeros(10)}})
    rollback.close()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000100", "step-00000200", "step-00000250-t1", "step-00000300-t1"]
    again = Checkpointer(tmp_path, keep=2, is_leader=True)
    assert again.latest().name == "step-00000300-t1"
    again.start(again.latest())
    assert again.timeline == 1  # resuming the newest continues the timeline


def test_lineage_follows_parents_up_to_the_step_they_forked_at(tmp_path):
    for name in ("step-00000100", "step-00000200", "step-00000150-t1", "step-00000300-t1", "step-00000250-t2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    save_registry(tmp_path, [Timeline(0), Timeline(1, "step-00000100"), Timeline(2, "step-00000150-t1")])
    history = [p.name for p in lineage(tmp_path, [Timeline(0), Timeline(1, "step-00000100"), Timeline(2, "step-00000150-t1")], 2)]
    assert history == ["step-00000100", "step-00000150-t1", "step-00000250-t2"]
    assert checkpoint_name(7, 0) == "step-00000007" and checkpoint_name(7, 3) == "step-00000007-t3"


def test_a_crashed_save_leaves_a_partial_that_is_never_loaded_and_is_cleared(tmp_path):
    saved_steps(tmp_path, [1])
    partial = tmp_path / "step-00000002.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"torn")
    assert Checkpointer(tmp_path, keep=5, is_leader=True).latest().name == "step-00000001"
    saved_steps(tmp_path, [3], resumed_from=tmp_path / "step-00000001")
    assert not partial.exists()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_remote_copy_through_fsspec_is_verified_on_download(tmp_path, scheme):
    url = "memory://atoll-test/island-0" if scheme == "memory" else f"file://{tmp_path}/bucket/island-0"
    checkpointer = Checkpointer(tmp_path / "local", keep=2, is_leader=True, remote_url=url)
    checkpointer.start(None)
    checkpointer.save(5, {"w": {"t": torch.arange(100.0)}})
    checkpointer.wait()
    checkpointer.wait_remote(60)
    assert [e.fields for e in checkpointer.remote_events()] == [{"checkpoint_remote_step": 5}]
    checkpointer.close()
    fs, root = fsspec.core.url_to_fs(url)
    assert sorted(Path(p).name for p in fs.ls(f"{root}/step-00000005", detail=False)) == [".metadata", "__0_0.distcp", "manifest.json"]

    found = Checkpointer(tmp_path / "other", keep=2, is_leader=True).find_resumable(f"{url}/step-00000005", print)
    assert found.manifest.step == 5 and verify(found.path).step == 5

    fs.pipe_file(f"{root}/step-00000005/__0_0.distcp", b"not the shard")
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp"):
        remote.download(f"{url}/step-00000005", tmp_path / "again" / "step-00000005")
    assert not (tmp_path / "again" / "step-00000005").exists()
    fs.rm(f"{root}/step-00000005/manifest.json")
    with pytest.raises(CorruptCheckpoint, match="manifest"):
        remote.download(f"{url}/step-00000005", tmp_path / "again" / "step-00000005")


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory bucket whose next `failures` uploads of a file fail, as a full or unreachable store does."""

    protocol = "atoll-flaky"
    failures = 0

    def put_file(self, lpath, rpath, *args, **kwargs):
        if FlakyFileSystem.failures > 0:
            FlakyFileSystem.failures -= 1
            raise OSError(28, "No space left on device")
        return super().put_file(lpath, rpath, *args, **kwargs)


def test_a_failing_remote_copy_is_retried_reported_and_recovers_while_local_retention_goes_on(tmp_path):
    fsspec.register_implementation(FlakyFileSystem.protocol, FlakyFileSystem, clobber=True)
    url = "atoll-flaky://bucket/island-0"
    FlakyFileSystem.failures = 3  # both tries of step 1, then the first of step 2
    checkpointer = Checkpointer(tmp_path, keep=2, is_leader=True, remote_url=url, remote_attempts=2, remote_backoff_s=0.01)
    checkpointer.start(None)
    report = checkpointer.save(1, {"w": {"t": torch.full((100,), 1.0)}})  # returns: the copy happens behind it
    checkpointer.wait()
    checkpointer.wait_remote(60)
    [failed] = checkpointer.remote_events()
    assert report.step == 1 and (tmp_path / "step-00000001" / "manifest.json").is_file()
    assert set(failed.fields) == {"checkpoint_remote_error"} and failed.fields["checkpoint_remote_error"] == failed.line
    assert failed.line == (f"checkpoint: remote copy of step-00000001 to {url}/step-00000001 failed (2 attempt(s), last: "
                           "OSError: [Errno 28] No space left on device); training goes on and the next checkpoint is copied again")
    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(f"{root}/step-00000001/manifest.json")  # an incomplete copy, which download refuses

    checkpointer.save(2, {"w": {"t": torch.full((100,), 2.0)}})
    checkpointer.wait()
    checkpointer.wait_remote(60)
    [recovered] = checkpointer.remote_events()
    assert recovered.fields == {"checkpoint_remote_step": 2} and recovered.line.endswith("after 2 attempts")
    assert remote.download(f"{url}/step-00000002", tmp_path / "fetched" / "step-00000002").step == 2
    assert FlakyFileSystem.failures == 0

    FlakyFileSystem.failures = 10**6  # the store is gone for good: retention goes on without it
    for step in (3, 4):
        checkpointer.save(step, {"w": {"t": torch.full((100,), float(step))}})
    checkpointer.wait()
    checkpointer.wait_remote(60)
    gone = checkpointer.remote_events()
    assert all("checkpoint_remote_error" in e.fields for e in gone)
    assert "copy of step-00000004" in gone[-1].line and "(2 attempt(s)" in gone[-1].line  # the newest gets every try
    checkpointer.close()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]
    FlakyFileSystem.failures = 0


def test_manifest_records_the_mesh_facts_it_is_given(tmp_path):
    member = SimpleNamespace(epoch=SimpleNamespace(number=3, members=("a", "b")))
    facts = checkpoint_facts(SimpleNamespace(outer_steps=4, member=member), "cd" * 32)
    checkpointer = Checkpointer(tmp_path, keep=2, is_leader=True)
    checkpointer.start(None, run_id="run-1", island_id="a", config_fingerprint="f" * 64)
    checkpointer.save(9, {"w": {"t": torch.zeros(3)}}, facts)
    checkpointer.close()
    manifest = read_manifest(tmp_path / "step-00000009")
    assert (manifest.run_id, manifest.island_id, manifest.outer_step, manifest.epoch, manifest.members) == ("run-1", "a", 4, 3, ["a", "b"])
    assert json.loads((tmp_path / "step-00000009" / "manifest.json").read_text())["config_fingerprint"] == "f" * 64


def test_fresh_run_dir_checks_and_default_dirs_per_island(tmp_path):
    check_fresh_run_dir(tmp_path / "new", None)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "run.json").write_text(json.dumps({"island_id": "berlin"}))
    with pytest.raises(UserError, match="--resume"):
        check_fresh_run_dir(tmp_path / "used", None)
    with pytest.raises(UserError, match="--resume"):
        check_fresh_run_dir(tmp_path / "used", "paris")
    check_fresh_run_dir(tmp_path / "used", "berlin")  # the same island restarted into its own directory
    berlin, paris = default_run_dir("demo", "berlin"), default_run_dir("demo", "paris")
    assert berlin != paris and berlin.name.endswith("-berlin") and default_run_dir("demo").name.startswith("demo-")


def test_the_run_dir_lock_names_its_owner_and_is_free_again_after_release(tmp_path):
    lock = RunDirLock(tmp_path, "berlin")
    with pytest.raises(UserError, match=r"in use by island 'berlin' \(pid \d+"):
        RunDirLock(tmp_path, "paris")
    lock.release()
    RunDirLock(tmp_path, "paris").release()


def test_a_failed_start_leaves_no_directory_holding_only_the_lock(tmp_path):
    RunDirLock(tmp_path / "runs" / "fresh", "berlin").release()
    assert not (tmp_path / "runs").exists()  # both directories the lock made are gone
    (tmp_path / "mine").mkdir()
    RunDirLock(tmp_path / "mine", None).release()
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []  # the user's own directory stays
    lock = RunDirLock(tmp_path / "ran", None)
    (tmp_path / "ran" / "run.json").write_text("{}")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "ran").iterdir()) == [".atoll.lock", "run.json"]


def test_a_restarted_island_waiting_on_a_failed_start_takes_a_lock_file_that_exists(tmp_path):
    first = RunDirLock(tmp_path / "run", "berlin")
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(RunDirLock(tmp_path / "run", "berlin", same_island_wait_s=30)))
    waiter.start()
    time.sleep(0.5)  # the waiter has opened the lock file and is polling it
    first.release()  # a failed start: the lock file and the directory are removed
    waiter.join(timeout=30)
    second = taken[0]
    assert (tmp_path / "run" / ".atoll.lock").is_file()
    assert os.stat(second.path).st_ino == os.fstat(second._file.fileno()).st_ino
    with pytest.raises(UserError, match="in use by island 'berlin'"):
        RunDirLock(tmp_path / "run", "paris")
    second.release()


def test_an_island_restarted_under_its_id_waits_for_its_previous_process_then_gives_up(tmp_path):
    lock = RunDirLock(tmp_path, "berlin")
    with pytest.raises(UserError, match="in use by island 'berlin'"):
        RunDirLock(tmp_path, "berlin", same_island_wait_s=0.5)
    lock.release()
    RunDirLock(tmp_path, "berlin", same_island_wait_s=0.5).release()
