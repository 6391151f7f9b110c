"""Sources and prepared shards: formats, prepare (parallel, resumable, remote), checks on reading."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import REPO, run_atoll

from atoll.config import load_config
from atoll.data import (
    ByteTokenizer,
    PrepareSettings,
    ShardError,
    Source,
    SourceError,
    SourceSpec,
    load_tokenizer,
    open_prepared,
    prepare,
    train_bpe,
)
from atoll.data import shards as shards_module
from atoll.errors import UserError


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three small sources in three formats: parquet (2 files), jsonl.gz (2 files), text files."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "pq").mkdir()
    for f in range(2):
        pq.write_table(pa.table({"text": [f"parquet {f}/{i} " * (5 + i % 7) for i in range(150)], "id": list(range(150))}),
                       root / "pq" / f"part-{f}.parquet")
    (root / "js").mkdir()
    for f in range(2):
        # "meta" changes type between lines, as it does in real dumps: only the text field is parsed
        write_jsonl(root / "js" / f"{f}.jsonl.gz", [{"text": f"json {f}.{i} " * 8, "meta": i if i % 2 else "x"} for i in range(120)], gzip.open)
    (root / "tx").mkdir()
    for i in range(40):
        (root / "tx" / f"{i:02d}.txt").write_text(f"text file {i}\n" * 20)
    return root


def specs(corpus) -> list[SourceSpec]:
    return [
        SourceSpec("pq", str(corpus / "pq"), 0.6),
        SourceSpec("js", str(corpus / "js" / "*.jsonl.gz"), 0.3),
        SourceSpec("tx", str(corpus / "tx"), 0.1),
    ]


SETTINGS = PrepareSettings("byte", val_fraction=0.1, shard_tokens=4000, on_bad_file="error")


def quiet(*_: object) -> None:
    return None


def test_sources_detect_their_format_and_read_every_document(corpus):
    counts = {}
    for spec in specs(corpus):
        source = Source(spec)
        docs = [d for piece in source.pieces for batch in source.documents(piece) for d in batch]
        counts[spec.name] = (source.format, len(source.pieces), len(docs))
        assert len({d.key for d in docs}) == len(docs)
    assert counts == {"pq": ("parquet", 2, 300), "js": ("jsonl", 2, 240), "tx": ("text", 1, 40)}


def test_prepare_writes_checked_uint16_shards_and_a_manifest_per_source(corpus, tmp_path):
    report = prepare(specs(corpus), str(tmp_path / "out"), SETTINGS, log=quiet, progress=False)
    m = report.manifests["pq"]
    assert m["dtype"] == "uint16" and m["tokenizer"] == "byte"
    assert m["documents"]["train"] + m["documents"]["val"] == 300
    assert 0 < m["documents"]["val"] < 60
    assert len(m["shards"]["train"]) > 2 and all(len(s["sha256"]) == 64 for s in m["shards"]["train"])
    prepared = open_prepared("pq", str(tmp_path / "out"), ByteTokenizer(), str(tmp_path / "cache"))
    assert len(prepared.train) == m["tokens"]["train"] and prepared.train.dtype == np.uint16
    # the shards hold the documents, each followed by eos, in source order
    first_doc = pq.read_table(corpus / "pq" / "part-0.parquet")["text"][0].as_py().encode()
    eos = np.nonzero(prepared.train[np.arange(len(prepared.train))] == 256)[0]
    assert len(eos) == m["documents"]["train"]
    assert bytes(prepared.train[np.arange(eos[0])].astype(np.uint8)) in (first_doc, pq.read_table(corpus / "pq" / "part-0.parquet")["text"][1].as_py().encode())


def test_prepare_with_two_workers_gives_the_same_manifests_and_a_second_run_does_nothing(corpus, tmp_path):
    one = prepare(specs(corpus), str(tmp_path / "one"), SETTINGS, workers=1, log=quiet, progress=False)
    two = prepare(specs(corpus), str(tmp_path / "two"), SETTINGS, workers=2, log=quiet, progress=False)
    assert one.manifests == two.manifests
    again = prepare(specs(corpus), str(tmp_path / "two"), SETTINGS, workers=2, log=quiet, progress=False)
    assert again.tokens_done == 0 and again.manifests == one.manifests


def test_interrupted_prepare_resumes_without_redoing_finished_shards(corpus, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    reference = prepare(specs(corpus), str(tmp_path / "ref"), SETTINGS, log=quiet, progress=False).manifests
    written = []
    real_write = shards_module.Store.write

    def write_then_die(self, data, *parts):
        real_write(self, data, *parts)
        if parts[-1].endswith(".npy"):
            written.append(parts)
            if len(written) == 5:
                raise KeyboardInterrupt

    monkeypatch.setattr(shards_module.Store, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(specs(corpus), out, SETTINGS, log=quiet, progress=False)
    monkeypatch.setattr(shards_module.Store, "write", real_write)
    finished = {p: (tmp_path / "out" / p[0] / p[1]).stat().st_mtime_ns for p in written[:4]}  # the 5th: its record was not updated

    resumed = prepare(specs(corpus), out, SETTINGS, log=quiet, progress=False)
    assert resumed.manifests == reference
    assert {p: (tmp_path / "out" / p[0] / p[1]).stat().st_mtime_ns for p in finished} == finished
    assert resumed.tokens_done < sum(m["tokens"]["train"] + m["tokens"]["val"] for m in reference.values())


def test_corrupt_or_truncated_shard_is_refused_naming_the_file(corpus, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(specs(corpus)[:1], str(out), SETTINGS, log=quiet, progress=False).manifests["pq"]
    shard = out / "pq" / manifest["shards"]["train"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {shard} does not match the sha256.*atoll data prepare") as err:
        open_prepared("pq", str(out), ByteTokenizer(), str(tmp_path / "cache"))
    assert "\n" not in str(err.value)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ShardError, match=f"shard {shard} has .* bytes, not the"):
        open_prepared("pq", str(out), ByteTokenizer(), None)
    # as the message says, prepare again redoes the broken piece (only that one)
    lines = []
    again = prepare(specs(corpus)[:1], str(out), SETTINGS, log=lines.append, progress=False)
    assert again.manifests["pq"] == manifest and "1 piece(s) with missing or corrupt shards" in lines[0]
    assert 0 < again.tokens_done < manifest["tokens"]["train"] + manifest["tokens"]["val"]
    open_prepared("pq", str(out), ByteTokenizer(), None)


def test_shards_of_another_tokenizer_are_refused_naming_the_manifest(corpus, tmp_path):
    out = tmp_path / "out"
    prepare(specs(corpus)[:1], str(out), SETTINGS, log=quiet, progress=False)
    bpe = train_bpe(["some text to learn from " * 50], 300, tmp_path / "tok.json")
    with pytest.raises(ShardError, match=f"{out / 'pq' / 'manifest.json'} was tokenised with byte but data.tokenizer is hf:"):
        open_prepared("pq", str(out), bpe, None)
    with pytest.raises(ShardError, match="run `atoll data prepare CONFIG` first"):
        open_prepared("js", str(out), ByteTokenizer(), None)


def test_shards_live_behind_an_fsspec_url(corpus, tmp_path):
    url = "memory://atoll-test/prepared"
    report = prepare(specs(corpus)[1:2], url, SETTINGS, log=quiet, progress=False)
    prepared = open_prepared("js", url, ByteTokenizer(), str(tmp_path / "cache"))
    assert len(prepared.train) == report.manifests["js"]["tokens"]["train"]
    assert list((tmp_path / "cache" / "shards").glob("*.npy"))  # downloaded, verified, memory-mapped
    import fsspec

    fs = fsspec.filesystem("memory")
    shard = report.manifests["js"]["shards"]["val"][0]["file"]
    fs.pipe_file(f"/atoll-test/prepared/js/{shard}", b"not the shard")
    with pytest.raises(ShardError, match=f"memory:///?atoll-test/prepared/js/{shard} does not match"):
        open_prepared("js", url, ByteTokenizer(), str(tmp_path / "other-cache"))


def test_binary_file_is_refused_or_skipped_and_counted(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(30):  # enough that some are held out for validation
        (tmp_path / "src" / f"{i}.txt").write_text("good text\n" * 50)
    blob = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes().replace(b"\x00", b"\x01")
    (tmp_path / "src" / "blob.txt").write_bytes(blob)  # ~43% undecodable, as a renamed binary would be
    spec = [SourceSpec("t", str(tmp_path / "src"))]
    with pytest.raises(SourceError, match=r"blob.txt is \d+% undecodable as UTF-8.*on_bad_file = \"skip\""):
        prepare(spec, str(tmp_path / "a"), SETTINGS, log=quiet, progress=False)
    skip = PrepareSettings("byte", 0.1, 4000, "skip")
    lines = []
    manifest = prepare(spec, str(tmp_path / "b"), skip, log=lines.append, progress=False).manifests["t"]
    assert [p.rsplit("/", 1)[-1] for p in manifest["skipped_files"]] == ["blob.txt"]
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == 30
    assert any("skipped 1 bad file(s)" in line for line in lines)


def test_prepare_refuses_a_source_without_validation_tokens_naming_the_fix(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(20):
        (tmp_path / "src" / f"{i:02d}.txt").write_text(f"document {i}\n" * 30)
    config = tmp_path / "data.toml"
    config.write_text(f'[data]\nprepared = "{tmp_path / "out"}"\nval_fraction = 0.01\n'
                      f'[[data.sources]]\nname = "small"\npath = "{tmp_path / "src"}"\n')
    refused = run_atoll(["data", "prepare", str(config), "--no-progress"], 120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert ("source 'small': none of its 20 documents fell in the validation split (data.val_fraction 0.01): "
            "set data.val_fraction to 0.15 or more and prepare again") in refused.stderr
    assert not (tmp_path / "out" / "small" / "manifest.json").exists()
    fixed = run_atoll(["data", "prepare", str(config), "--no-progress", "--data.val_fraction", "0.15"], 120)
    assert fixed.returncode == 0, fixed.stderr
    manifest = json.loads((tmp_path / "out" / "small" / "manifest.json").read_text())
    assert manifest["documents"]["val"] > 0 and manifest["tokens"]["val"] > 0


def test_legacy_directory_source_refuses_a_binary_file(tmp_path):
    from atoll.data import load_documents

    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("fine\n")
    (tmp_path / "z.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(ValueError, match="z.txt holds NUL bytes"):
        load_documents(str(tmp_path), "train", 0.3)


def test_zstd_jsonl_parquet_text_field_and_saved_hf_dataset_sources(tmp_path):
    import datasets

    with open(tmp_path / "a.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
        for i in range(30):
            f.write((json.dumps({"content": f"zstd row {i}"}) + "\n").encode())
    datasets.Dataset.from_dict({"body": [f"saved row {i}" for i in range(25)]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub-like").mkdir()
    for f in range(2):  # a dataset repository as the Hub serves it, streamed by `datasets` from this directory
        pq.write_table(pa.table({"text": [f"streamed row {i}" for i in range(f * 10, f * 10 + 10)]}), tmp_path / "hub-like" / f"train-{f}.parquet")
    cases = [
        (SourceSpec("z", str(tmp_path / "a.jsonl.zst"), text_field="content"), "jsonl", 30),
        (SourceSpec("h", str(tmp_path / "saved"), text_field="body"), "hf-disk", 25),
        (SourceSpec("s", str(tmp_path / "hub-like"), format="hf"), "hf", 20),
    ]
    for spec, fmt, n in cases:
        source = Source(spec)
        docs = [d.text for piece in source.pieces for batch in source.documents(piece) for d in batch]
        assert source.format == fmt and len(docs) == n and docs[0].endswith("row 0")
    with pytest.raises(SourceError, match="has no field 'text'.*set text_field"):
        list(Source(SourceSpec("z", str(tmp_path / "a.jsonl.zst"))).documents(Source(SourceSpec("z", str(tmp_path / "a.jsonl.zst"))).pieces[0]))
    with pytest.raises(SourceError, match="nothing matches"):
        Source(SourceSpec("m", str(tmp_path / "missing" / "*.parquet")))


def test_a_mistyped_local_path_is_named_at_once_and_only_owner_name_goes_to_the_hub(tmp_path, monkeypatch):
    from atoll.data import sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus" / "docs").mkdir(parents=True)
    opened = []
    monkeypatch.setattr(sources, "_open_hf", lambda spec, fmt: opened.append(spec.path) or SimpleNamespace(n_shards=2))
    for path in ["corpus/dcos", "./dcos", "corpus/dcos/*.txt", "dcos.jsonl", "data/en/dcos", "~/dcos"]:
        with pytest.raises(SourceError, match=f"nothing matches {re.escape(repr(path))}; give an existing file") as err:
            Source(SourceSpec("c", path))
        assert ('format = "hf"' in str(err.value)) == (path == "corpus/dcos")
    assert opened == []
    assert len(Source(SourceSpec("h", "someowner/somename")).pieces) == 2 and opened == ["someowner/somename"]


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # offline, as on a machine without network (the environment variables are read at import)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="cannot open Hugging Face dataset 'atoll-test/no-such-dataset'") as err:
        Source(SourceSpec("x", "atoll-test/no-such-dataset"))
    assert "\n" not in str(err.value)


def test_llama3_style_tokenizer_directory_adds_its_bos_and_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    (tmp_path / "llama").mkdir()
    tok.save(str(tmp_path / "llama" / "tokenizer.json"))
    (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    loaded = load_tokenizer(str(tmp_path / "llama"))
    assert loaded.eos_id == 1 and loaded.vocab_size == 5
    encoded = shards_module.encode_documents(loaded, ["hello world", "world"], np.dtype(np.uint16))
    assert [e.tolist() for e in encoded] == [[0, 2, 3, 1], [0, 3, 1]]


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[train]\nrun_name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(UserError, match=f"config file {path} is not UTF-8"):
        load_config(path)
    result = subprocess.run([sys.executable, "-m", "atoll.cli", "data", "prepare", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not UTF-8" in result.stderr


def test_intellect1_mixture_config_lists_the_published_sources_and_weights():
    cfg = load_config(REPO / "configs" / "data" / "intellect-1.toml")
    weights = {s.name: s.weight for s in cfg.data.sources}
    assert weights == {"fineweb-edu": 0.55, "fineweb": 0.1, "stack-v1-popular": 0.2, "dclm-baseline": 0.1, "open-web-math": 0.05}
    assert cfg.data.sources[0].path == "PrimeIntellect/fineweb-edu"
    job = load_config(REPO / "configs" / "intellect-1-10b.toml", {"data.mixture": str(REPO / "configs" / "data" / "intellect-1.toml")})
    assert [s.name for s in job.data.sources] == list(weights)
