"""Mixture sampling: proportions, disjointness under membership changes, passes, resumption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atoll.data import MixtureLoader, MixturePlan, WindowPermutation, block_counts
from atoll.data.mixture import MIXTURE_BLOCK

SEQ = 4


def window_ids(loader: MixtureLoader, first: int, count: int) -> list[tuple[int, int, int]]:
    """(source, pass, window) of run-wide samples [first, first + count)."""
    return list(zip(*(a.tolist() for a in loader.locate(np.arange(first, first + count)))))


def tagged_sources(windows: list[int]) -> list[np.ndarray]:
    """Token arrays whose every window starts with a token naming (source, window): easy to decode."""
    out = []
    for s, n in enumerate(windows):
        tokens = np.zeros(n * SEQ + 1, dtype=np.uint32)
        tokens[0:n * SEQ:SEQ] = s * 10_000 + np.arange(n)
        out.append(tokens)
    return out


def test_block_counts_sum_to_the_block_and_follow_the_weights():
    counts = block_counts([0.55, 0.2, 0.1, 0.1, 0.05])
    assert counts.sum() == MIXTURE_BLOCK
    assert np.allclose(counts / MIXTURE_BLOCK, [0.55, 0.2, 0.1, 0.1, 0.05], atol=0.5 / MIXTURE_BLOCK + 1e-12)
    assert block_counts([6, 3, 1]).tolist() == block_counts([0.6, 0.3, 0.1]).tolist()


@pytest.mark.parametrize("weights", [[0.0, 1.0], [-1.0, 2.0], [1.0, 1e-9]])
def test_weights_that_starve_a_source_are_refused(weights):
    with pytest.raises(ValueError, match="weight"):
        block_counts(weights)


def test_empirical_mixture_over_2000_global_batches_is_within_1_percent():
    global_batch = 8
    plan = MixturePlan([0.6, 0.3, 0.1], seed=3)
    source, _ = plan.locate(np.arange(2000 * global_batch))
    shares = np.bincount(source, minlength=3) / source.size
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.01
    per_batch = source.reshape(2000, global_batch)
    assert (per_batch != per_batch[:, :1]).any(axis=1).mean() > 0.5  # batches mix sources


def test_ordinals_number_each_sources_samples_without_gaps():
    plan = MixturePlan([0.6, 0.3, 0.1], seed=0)
    source, ordinal = plan.locate(np.arange(3 * MIXTURE_BLOCK + 100))
    for s in range(3):
        assert ordinal[source == s].tolist() == list(range(int((source == s).sum())))


def test_plan_is_a_function_of_the_seed_and_random_access():
    a, b = MixturePlan([0.5, 0.5], seed=1), MixturePlan([0.5, 0.5], seed=1)
    far = np.arange(10 * MIXTURE_BLOCK - 5, 10 * MIXTURE_BLOCK + 5)
    source, ordinal = a.locate(far)  # straight to block 10, across a block boundary
    whole_source, whole_ordinal = b.locate(np.arange(far[-1] + 1))
    assert np.array_equal(source, whole_source[far]) and np.array_equal(ordinal, whole_ordinal[far])
    assert not np.array_equal(a.locate(np.arange(64))[0], MixturePlan([0.5, 0.5], seed=2).locate(np.arange(64))[0])


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 12_345])
def test_window_permutation_is_a_bijection(n):
    perm = WindowPermutation(n, key=5)
    image = perm(np.arange(n))
    assert sorted(image.tolist()) == list(range(n))
    if n > 7:
        assert not np.array_equal(image, np.arange(n))
        assert not np.array_equal(image, WindowPermutation(n, key=6)(np.arange(n)))


def test_islands_joining_and_leaving_never_read_a_sample_twice_within_a_pass():
    """2 -> 3 -> 2 islands of 2 local ranks each, reading as atoll.sync does from the run-wide cursor."""
    windows = [400, 200, 20]
    sources = tagged_sources(windows)
    global_batch, ranks = 4, 2
    loaders = {}
    cursor = 0
    seen: dict[tuple[int, int], set[int]] = {}
    for world, steps in ((2, 10), (3, 10), (2, 10)):
        for _ in range(steps):
            for island in range(world):
                first = cursor + island * global_batch
                for rank in range(ranks):
                    loader = loaders.setdefault(rank, MixtureLoader(sources, ["a", "b", "c"], [0.6, 0.3, 0.1], SEQ, global_batch, rank, ranks, seed=7))
                    inputs, _ = loader.batch_at(first)
                    for s, p, w in window_ids(loader, first + rank * loader.per_rank, loader.per_rank):
                        key = (s, p)
                        assert w not in seen.setdefault(key, set()), f"window {w} of source {s} read twice in pass {p}"
                        seen[key].add(w)
                    assert inputs[:, 0].tolist() == [s * 10_000 + w for s, _, w in window_ids(loader, first + rank * loader.per_rank, loader.per_rank)]
            cursor += world * global_batch
    assert any(p > 0 for _, p in seen)  # the smallest source ran out and went on with a new pass


def test_a_source_that_runs_out_starts_a_reshuffled_pass_and_says_so():
    sources = tagged_sources([50, 5])
    loader = MixtureLoader(sources, ["big", "small"], [0.5, 0.5], SEQ, 4, 0, 1, seed=0)
    ids = window_ids(loader, 0, 40)
    small = [(p, w) for s, p, w in ids if s == 1]
    first, second = [w for p, w in small if p == 0], [w for p, w in small if p == 1]
    assert sorted(first) == list(range(5)) and sorted(second) == list(range(5))
    assert first != second
    for step in range(10):
        loader.next_batch()
    notes = loader.drain_notes()
    assert any("'small' ran out and starts pass 2" in n for n in notes)
    assert loader.drain_notes() == []


def test_resumed_loader_continues_identically_and_keeps_tokens_by_source():
    sources = tagged_sources([30, 20, 10])
    names, weights = ["a", "b", "c"], [0.6, 0.3, 0.1]
    straight = MixtureLoader(sources, names, weights, SEQ, 4, 0, 1, seed=2)
    expected = [straight.next_batch()[0] for _ in range(12)]
    first = MixtureLoader(sources, names, weights, SEQ, 4, 0, 1, seed=2)
    for _ in range(5):
        first.next_batch()
    # resumed on 2 ranks: together they read what the single rank would have
    ranks = [MixtureLoader(sources, names, weights, SEQ, 4, r, 2, seed=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(first.state_dict())
    for step in range(5, 12):
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in ranks]), expected[step])
    resumed = ranks[1]
    assert resumed.tokens_by_source == straight.tokens_by_source
    assert sum(straight.tokens_by_source.values()) == 12 * 4 * SEQ


@pytest.mark.parametrize("change", [{"seed": 3}, {"weights": [0.5, 0.3, 0.2]}, {"names": ["a", "b", "d"]}])
def test_resuming_with_other_sources_weights_or_seed_is_refused(change):
    sources = tagged_sources([30, 20, 10])
    settings = {"names": ["a", "b", "c"], "weights": [0.6, 0.3, 0.1], "seed": 2}
    saved = MixtureLoader(sources, settings["names"], settings["weights"], SEQ, 4, 0, 1, settings["seed"]).state_dict()
    settings.update(change)
    loader = MixtureLoader(sources, settings["names"], settings["weights"], SEQ, 4, 0, 1, settings["seed"])
    with pytest.raises(ValueError, match="would change the data order"):
        loader.load_state_dict(saved)


def test_source_without_a_full_window_is_named():
    with pytest.raises(ValueError, match="source 'tiny'"):
        MixtureLoader([np.zeros(100), np.zeros(3)], ["big", "tiny"], [1, 1], SEQ, 4, 0, 1, seed=0)
