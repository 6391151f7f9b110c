"""Streaming DiLoCo's fragments (`diloco.fragments`): the split and the schedule as pure functions,
the fragment outer step without processes (it touches its fragment only, and P fragment steps on
the same contributions are the whole-model step bit for bit), and the config's bounds. The
multi-process runs are in test_islands (2 x 2 islands, every digest equal) and test_overlap
(whole-run resume with a fragment in flight)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from atoll.config import JobConfig
from atoll.diloco import DiLoCo
from atoll.fragments import fragment_at, last_averaged, split_fragments
from atoll.model import Llama, get_size


def debug_model(seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(get_size("debug"))


def test_fragments_are_consecutive_blocks_with_the_embeddings_first_and_the_head_last():
    names = ["tok_embeddings.weight", *(f"layers.{b}.{w}" for b in range(5) for w in ("wq", "w1")), "norm.weight", "output.weight"]
    sizes = list(range(1, len(names) + 1))
    fragments = split_fragments(names, sizes, 3)
    assert [list(f.params) for f in fragments] == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]  # blocks 0-1, 2-3, 4
    assert [(f.span.start, f.span.stop) for f in fragments] == [(0, 15), (15, 45), (45, sum(sizes))]
    assert split_fragments(names, sizes, 1)[0].span == slice(0, sum(sizes))
    with pytest.raises(ValueError, match=r"diloco.fragments \(6\) is more than the model's 5 transformer blocks: use at most 5"):
        split_fragments(names, sizes, 6)


def test_each_fragment_is_averaged_every_h_steps_staggered_by_h_over_p_and_the_last_step_averages_all():
    h, p, steps = 12, 3, 40
    due = [s for s in range(1, steps + 1) if s % (h // p) == 0]
    schedule = {s: fragment_at(s, s == steps, h, p) for s in due}
    assert schedule == {4: 0, 8: 1, 12: 2, 16: 0, 20: 1, 24: 2, 28: 0, 32: 1, 36: 2, 40: None}
    last = {f: 0 for f in range(p)}  # where each fragment's inner phase began, by walking the schedule
    for s in due:
        for f in range(p) if schedule[s] is None else [schedule[s]]:
            assert last_averaged(s, f, h, p) == last[f], (s, f)
            last[f] = s
    assert fragment_at(24, False, 12, 1) is None and last_averaged(24, 0, 12, 1) == 12 and last_averaged(30, 0, 12, 1) == 24


def one_island_steps(fragments: int, order: list[int | None]) -> tuple[DiLoCo, Llama]:
    """An island's outer steps on one inner phase: the fragments of `order` in turn, each averaged
    by a one-island mean (the identity), from the same start and inner weights."""
    model = debug_model(0)
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True, fragments=fragments)
    trained = debug_model(1)
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), trained.parameters()):
            mine.copy_(theirs)
    for fragment in order:
        diloco.select(fragment)
        diloco.set_weight_kept(own=0.99, run=0.99)
        diloco.pseudo_gradient()
        diloco.apply()
    return diloco, model


def test_p_fragment_steps_on_the_same_inner_phase_are_the_whole_model_step_bit_for_bit():
    whole, whole_model = one_island_steps(1, [None])
    parts, parts_model = one_island_steps(2, [1, 0])
    assert torch.equal(parts.outer, whole.outer)
    assert torch.equal(parts.optimizer.state[parts.outer]["momentum_buffer"], whole.optimizer.state[whole.outer]["momentum_buffer"])
    for a, b in zip(parts_model.parameters(), whole_model.parameters()):
        assert torch.equal(a, b)
    assert parts.state_digest() == whole.state_digest()


def test_a_fragment_step_changes_its_fragment_only():
    start = DiLoCo(debug_model(0), lr=0.7, momentum=0.9, nesterov=True, fragments=2)
    diloco, model = one_island_steps(2, [0])
    trained = torch.cat([p.detach().reshape(-1) for p in debug_model(1).parameters()])
    inner = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    first, second = diloco.fragments[0].span, diloco.fragments[1].span
    assert not torch.equal(diloco.outer[first], start.outer[first]) and torch.equal(inner[first], diloco.outer[first])
    assert torch.equal(diloco.outer[second], start.outer[second])  # not averaged yet
    assert torch.equal(inner[second], trained[second])  # the island's own inner weights, untouched
    assert not diloco.optimizer.state[diloco.outer]["momentum_buffer"][second].any()
    diloco.restore_inner(whole=True)  # the guard's reset takes every fragment back to the outer weights
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), diloco.outer)


def test_fragments_must_divide_h_and_overlap_must_land_within_a_fragments_period():
    with pytest.raises(ValidationError, match=r"diloco.fragments \(4\) must divide diloco.inner_steps \(6\)"):
        JobConfig.model_validate({"diloco": {"inner_steps": 6, "fragments": 4}})
    with pytest.raises(ValidationError, match=r"overlap_steps \(3\) must be below diloco.inner_steps / diloco.fragments \(3\)"):
        JobConfig.model_validate({"diloco": {"inner_steps": 6, "fragments": 2, "overlap_steps": 3}})
    assert JobConfig.model_validate({"diloco": {"inner_steps": 6, "fragments": 2, "overlap_steps": 2}}).diloco.fragments == 2


def test_the_progress_line_names_the_fragment_of_an_outer_step():
    from atoll.metrics import _summary

    record = {"step": 12, "loss": 2.5, "outer_step": 3, "sync_s": 0.14, "utilization": 0.9, "bytes_sent": 2e6}
    assert "fragment" not in _summary(record)
    assert "outer_step=3 fragment=1 sync=0.14s" in _summary({**record, "fragment": 1})
    assert "outer_step=3 fragment=all sync=0.14s" in _summary({**record, "fragment": None})


def test_the_simulate_summary_says_over_how_many_fragments(tmp_path):
    import json

    from test_simulate import write_island

    from atoll.simulate import summarize

    write_island(tmp_path, "island-0", 12_000_000, [0.1, 0.5, 0.2], [0.9, 0.8, 0.85])
    whole = summarize(tmp_path)
    path = tmp_path / "island-0" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record, fragment in zip((r for r in records if "outer_step" in r), [0, 1, None]):
        record["fragment"] = fragment
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert summarize(tmp_path) == whole.replace("3 outer steps,", "3 outer steps over 2 fragments,")


@pytest.mark.timeout(180)
def test_survivors_agree_after_a_kill_during_a_fragments_overlapped_all_reduce(tmp_path):
    from test_elastic import assert_live_islands_agree, membership, simulate

    # 3 islands, H = 4 in 2 fragments, tau = 1: a fragment's outer step begins every 2 steps and lands
    # 1 later; 16 (the last) averages both. island-1 dies as outer step 3's all-reduce (fragment 0,
    # begun at 6) starts behind training: the survivors' rings fail, they report it when it lands at 7
    # and redo the fragment's step among the two, blocking, with the contributions they held
    outer = simulate(tmp_path / "run", str(tmp_path / "cache"), 3, 16, faults=["island-1=kill@allreduce:3"],
                     extra=["--diloco.fragments", "2", "--diloco.overlap_steps", "1"])

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["step"] for s in range(1, 9)] == [3, 5, 7, 9, 11, 13, 15, 16]
    assert [steps[s]["fragment"] for s in range(1, 9)] == [0, 1, 0, 1, 0, 1, 0, None]
    assert [steps[s]["world_size"] for s in range(1, 9)] == [3, 3, 2, 2, 2, 2, 2, 2]
    assert steps[3]["attempts"] == 2 and steps[3]["epoch"] == 1 and not steps[3]["skipped"]
    assert membership(tmp_path / "run")[1]["left"] == {"island-1": "its control connection closed (process gone)"}
