"""Data layer: corpus split, tokenizers, token cache and the resumable packed loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atoll.data import (
    ByteTokenizer,
    PackedLoader,
    iter_eval_batches,
    load_documents,
    load_split_tokens,
    load_tokenizer,
    source_files,
    split_files,
    stdlib_files,
    tokenize_documents,
    train_bpe,
)
from atoll.data import tokens as tokens_module

UNICODE_TEXT = "def f(x):\n    return x  # naïve café — 日本語 🐍\n"


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        (root / "sub" / f"doc{i:02d}.txt").write_text(f"document {i}\n" * (i + 1))
    (root / "notes.md").write_text("# notes\n")
    (root / "script.py").write_text("print('hi')\n")
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


def test_stdlib_corpus_is_large_and_deterministic():
    files = stdlib_files()
    assert len(files) > 300
    assert sum(f.stat().st_size for f in files) > 5_000_000
    assert files == stdlib_files()
    assert all(f.suffix == ".py" for f in files)
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts)


@pytest.mark.parametrize("source", ["stdlib", "dir"])
def test_split_is_disjoint_complete_and_stable(source, text_dir):
    source = str(text_dir) if source == "dir" else source
    train = split_files(source, "train", 0.1)[1]
    val = split_files(source, "val", 0.1)[1]
    assert train and val
    assert not set(train) & set(val)
    root, everything = source_files(source)
    assert sorted(train + val) == sorted(everything)
    assert split_files(source, "val", 0.1) == (root, val)


def test_split_keeps_both_sides_non_empty_at_extreme_fractions(text_dir):
    for fraction in (1e-9, 1 - 1e-9):
        assert split_files(str(text_dir), "train", fraction)[1]
        assert split_files(str(text_dir), "val", fraction)[1]


def test_bad_split_or_fraction_raises(text_dir):
    with pytest.raises(ValueError, match="split"):
        load_documents(str(text_dir), "test", 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        load_documents(str(text_dir), "train", 0.0)


def test_directory_source_reads_text_files_only(text_dir):
    docs = load_documents(str(text_dir), "train", 0.2) + load_documents(str(text_dir), "val", 0.2)
    assert len(docs) == 14
    assert "print('hi')\n" in docs and "# notes\n" in docs


def test_single_file_source_splits_by_position(tmp_path):
    path = tmp_path / "book.txt"
    lines = [f"line {i}\n" for i in range(100)]
    path.write_text("".join(lines))
    (train,) = load_documents(str(path), "train", 0.1)
    (val,) = load_documents(str(path), "val", 0.1)
    assert train + val == "".join(lines)
    assert val and train and val.startswith("line ")


def test_two_file_directory_gives_each_split_one_whole_file(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "b.txt").write_text("gamma\ndelta\n")
    docs = [load_documents(str(tmp_path), split, 0.5) for split in ("train", "val")]
    assert sorted(docs[0] + docs[1]) == ["alpha\nbeta\n", "gamma\ndelta\n"]


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_source_names_the_path(tmp_path, kind):
    path = tmp_path / kind
    if kind == "empty":
        path.mkdir()
    with pytest.raises(FileNotFoundError, match=kind):
        load_documents(str(path), "train", 0.1)


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE_TEXT)
    assert max(ids) < 256 and tok.eos_id == 256 and tok.vocab_size == 257
    assert tok.decode(ids + [tok.eos_id]) == UNICODE_TEXT
    assert tok.encode_array(UNICODE_TEXT).tolist() == ids


def test_tokenize_documents_appends_eos_after_each_document():
    tok = ByteTokenizer()
    out = tokenize_documents(["ab", "", "é"], tok)
    assert out.dtype == np.uint32
    assert out.tolist() == [97, 98, 256, 256, 0xC3, 0xA9, 256]


def test_missing_tokenizer_file_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match='"byte"'):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_trained_bpe_loads_and_round_trips(tmp_path):
    texts = (f.read_text(encoding="utf-8") for f in stdlib_files()[:50])
    path = tmp_path / "tok" / "tokenizer.json"
    trained = train_bpe(texts, vocab_size=400, out_path=path)
    tok = load_tokenizer(str(path))
    assert tok.name == trained.name and tok.name.startswith("hf:")
    assert tok.vocab_size == 400
    assert tok.decode([tok.eos_id]) == ""
    ids = tok.encode(UNICODE_TEXT)
    assert len(ids) < len(UNICODE_TEXT.encode())
    assert tok.decode(ids) == UNICODE_TEXT
    tokens = tokenize_documents([UNICODE_TEXT, "x = 1\n"], tok)
    assert tokens[len(ids)] == tok.eos_id and tokens[-1] == tok.eos_id
    assert not list(path.parent.glob(".*.tmp"))


def test_tokenizer_without_eos_token_is_rejected(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_bpe(["x = 1\n"], vocab_size=260, out_path=path)
    path.write_text(path.read_text().replace("<|endoftext|>", "<|pad|>"))
    with pytest.raises(ValueError, match="end-of-sequence"):
        load_tokenizer(str(path))


def test_token_cache_returns_the_same_array_without_retokenizing(text_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tok = ByteTokenizer()
    first = load_split_tokens(str(text_dir), "train", 0.2, tok, str(cache))
    assert len(list(cache.glob("tokens-train-*.npy"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(tokens_module, "tokenize_documents", refuse)
    second = load_split_tokens(str(text_dir), "train", 0.2, tok, str(cache))
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.uint32
    # every rank maps the cached file instead of loading its own copy
    assert isinstance(first, np.memmap) and isinstance(second, np.memmap) and not second.flags.writeable
    uncached = tokenize_documents(load_documents(str(text_dir), "train", 0.2), tok)
    np.testing.assert_array_equal(first, uncached)


def test_token_cache_misses_when_a_file_changes(text_dir, tmp_path):
    cache = str(tmp_path / "cache")
    tok = ByteTokenizer()
    before = load_split_tokens(str(text_dir), "train", 0.2, tok, cache)
    changed = split_files(str(text_dir), "train", 0.2)[1][0]
    changed.write_text(changed.read_text() + "appended\n")
    after = load_split_tokens(str(text_dir), "train", 0.2, tok, cache)
    assert len(after) == len(before) + len("appended\n")


# ---- loader -------------------------------------------------------------------------------

SEQ, GLOBAL_BATCH = 8, 4


def make_tokens(windows: int = 10) -> np.ndarray:
    return np.arange(windows * SEQ + 1, dtype=np.uint32)


def loader(rank=0, world=1, seed=0, tokens=None, shuffle=True) -> PackedLoader:
    tokens = make_tokens() if tokens is None else tokens
    return PackedLoader(tokens, SEQ, GLOBAL_BATCH, rank, world, seed, shuffle=shuffle)


def test_batches_have_shifted_targets_and_int64_shape():
    inputs, targets = loader().next_batch()
    assert inputs.shape == targets.shape == (GLOBAL_BATCH, SEQ)
    assert inputs.dtype == targets.dtype == torch.int64
    # Tokens are arange, so each row is consecutive and starts on a window boundary.
    assert torch.equal(targets, inputs + 1)
    assert torch.all(inputs[:, 0] % SEQ == 0)


def test_ranks_read_disjoint_slices_whose_union_is_the_single_process_batch():
    single, rank0, rank1 = loader(), loader(rank=0, world=2), loader(rank=1, world=2)
    seen = {0: set(), 1: set()}
    for step in range(7):
        whole = single.next_batch()[0]
        part0, part1 = rank0.next_batch()[0], rank1.next_batch()[0]
        assert torch.equal(torch.cat([part0, part1]), whole)
        if step < 2:  # within data-epoch 0 (8 of 10 windows) no window may repeat
            seen[0].update(part0[:, 0].tolist())
            seen[1].update(part1[:, 0].tolist())
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]


def test_every_window_is_seen_once_per_data_epoch():
    tokens = make_tokens(windows=12)
    stream = loader(tokens=tokens)
    starts = torch.cat([stream.next_batch()[0][:, 0] for _ in range(3)])
    assert sorted(starts.tolist()) == [w * SEQ for w in range(12)]


def test_resumed_loader_continues_identically_across_a_data_epoch_boundary():
    # 10 windows, batch 4: batches 2 and 4 straddle data-epoch boundaries.
    uninterrupted = loader(seed=3)
    reference = [uninterrupted.next_batch() for _ in range(8)]
    first = loader(seed=3)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    assert state == {"batches": 3, "seed": 3, "seq_len": SEQ, "global_batch": GLOBAL_BATCH}
    assert first.samples_consumed == 12 and first.tokens_consumed == 12 * SEQ
    resumed = loader(seed=3)
    resumed.load_state_dict(state)
    for want_inputs, want_targets in reference[3:]:
        inputs, targets = resumed.next_batch()
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)


def test_resume_on_a_different_world_size_sees_the_same_global_batches():
    single = loader(seed=5)
    for _ in range(2):
        single.next_batch()
    halves = [loader(rank=r, world=2, seed=5) for r in range(2)]
    for half in halves:
        half.load_state_dict(single.state_dict())
    assert torch.equal(torch.cat([h.next_batch()[0] for h in halves]), single.next_batch()[0])


def test_different_seeds_give_different_orders():
    a, b = loader(seed=0), loader(seed=1)
    orders = [torch.cat([s.next_batch()[0][:, 0] for _ in range(2)]) for s in (a, b)]
    assert not torch.equal(*orders)


def test_unshuffled_loader_reads_windows_in_order():
    inputs, _ = loader(shuffle=False).next_batch()
    assert inputs[:, 0].tolist() == [0, SEQ, 2 * SEQ, 3 * SEQ]


@pytest.mark.parametrize("key", ["seq_len", "seed", "global_batch"])
def test_load_state_dict_rejects_changed_settings(key):
    state = loader().state_dict()
    state[key] += 1
    with pytest.raises(ValueError, match=key):
        loader().load_state_dict(state)


def test_too_few_tokens_says_how_many_are_needed():
    with pytest.raises(ValueError, match=f"need at least {GLOBAL_BATCH * SEQ + 1} tokens"):
        loader(tokens=make_tokens(windows=GLOBAL_BATCH - 1))


def test_indivisible_global_batch_raises():
    with pytest.raises(ValueError, match="divisible"):
        PackedLoader(make_tokens(), SEQ, 3, 0, 2, 0)


def test_eval_batches_are_deterministic_and_capped():
    tokens = make_tokens(windows=10)
    runs = [list(iter_eval_batches(tokens, SEQ, GLOBAL_BATCH, 1, 2, max_batches=5)) for _ in "ab"]
    assert len(runs[0]) == 10 // GLOBAL_BATCH
    for (x0, y0), (x1, y1) in zip(*runs):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert runs[0][0][0][:, 0].tolist() == [2 * SEQ, 3 * SEQ]
    assert len(list(iter_eval_batches(tokens, SEQ, GLOBAL_BATCH, 0, 1, max_batches=1))) == 1


def test_eval_batches_zero_reads_the_whole_split():
    tokens = make_tokens(windows=10)
    whole = list(iter_eval_batches(tokens, SEQ, GLOBAL_BATCH, 0, 1, max_batches=0))
    capped = list(iter_eval_batches(tokens, SEQ, GLOBAL_BATCH, 0, 1, max_batches=1000))
    assert len(whole) == len(capped) == 10 // GLOBAL_BATCH
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, capped))
    with pytest.raises(ValueError, match="0 \\(all\\) or more"):
        iter_eval_batches(tokens, SEQ, GLOBAL_BATCH, 0, 1, max_batches=-1)
