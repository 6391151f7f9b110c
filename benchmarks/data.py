"""Data pipeline speed: `atoll data prepare` against `datasets.map`, and the loader against a step.

    python benchmarks/data.py [--mb 20] [--vocab 4096] [--batches 200]

Builds, in a temporary directory, a corpus of `--mb` MB of real text (the Python standard
library's files, repeated as needed) as 4 parquet files and 4 jsonl.gz files, and a byte-level
BPE of `--vocab` ids trained on its first MB. Then, in one run, on the same files and tokenizer:

1. `atoll data prepare` with 1 worker and with 2 workers (fresh output each time): tokens/s;
2. the plain Hugging Face way: `datasets.load_dataset(...)` then `.map(batched=True)` calling the
   same `tokenizers` tokenizer (its Arrow cache in the same temporary directory): tokens/s;
3. the mixture loader reading the `demo` config's batches (8 x 256, a 0.5/0.5 mixture of the two
   prepared sources): milliseconds per batch, next to one training step of the `demo` model
   (forward, backward, AdamW) on the same batch shape, on this machine's CPU.

tokens/s counts every token written (train and val, eos included). Prints figures only; never
fails on time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Only what `prepare` needs at import: its spawned workers re-import this script (no torch there).
from atoll.data.corpus import stdlib_files
from atoll.data.shards import PrepareSettings, open_prepared, prepare
from atoll.data.sources import SourceSpec
from atoll.data.tokenizer import Tokenizer, train_bpe

FILES_PER_FORMAT = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20, help="MB of text in each format (parquet, jsonl.gz)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--batches", type=int, default=200, help="loader batches to time")
    return parser.parse_args()


def documents(mb: float) -> list[str]:
    """Standard-library files as documents, repeated until they hold ``mb`` MB."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()]
    out, size, i = [], 0, 0
    while size < mb * 1e6:
        out.append(texts[i % len(texts)])
        size += len(out[-1])
        i += 1
    return out


def write_corpus(root: Path, docs: list[str]) -> None:
    (root / "pq").mkdir()
    (root / "js").mkdir()
    for f, part in enumerate(np.array_split(np.arange(len(docs)), FILES_PER_FORMAT)):
        texts = [docs[i] for i in part]
        pq.write_table(pa.table({"text": texts}), root / "pq" / f"part-{f}.parquet")
        with gzip.open(root / "js" / f"part-{f}.jsonl.gz", "wt") as out:
            out.writelines(json.dumps({"text": t}) + "\n" for t in texts)


def prepare_rate(specs: list[SourceSpec], out: Path, settings: PrepareSettings, workers: int) -> tuple[float, int]:
    report = prepare(specs, str(out), settings, workers=workers, progress=False, log=lambda _: None)
    tokens = sum(m["tokens"]["train"] + m["tokens"]["val"] for m in report.manifests.values())
    return tokens / report.seconds, tokens


def datasets_map_rate(root: Path, tokenizer_path: Path, cache: Path) -> tuple[float, int]:
    import datasets
    import tokenizers

    datasets.disable_progress_bars()
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    start = time.perf_counter()
    total = 0
    for builder, pattern in (("parquet", "pq/*.parquet"), ("json", "js/*.jsonl.gz")):
        ds = datasets.load_dataset(builder, data_files=str(root / pattern), split="train", cache_dir=str(cache))
        ids = ds.map(lambda b: {"ids": [e.ids for e in tok.encode_batch(b["text"])]}, batched=True,
                     remove_columns=ds.column_names)
        total += sum(len(x) + 1 for x in ids["ids"])  # + eos, as atoll counts
    return total / (time.perf_counter() - start), total


def loader_ms(out: Path, tokenizer: Tokenizer, batches: int) -> float:
    from atoll.data.loader import MixtureLoader

    tokens = [open_prepared(name, str(out), tokenizer, None).train for name in ("pq", "js")]
    loader = MixtureLoader(tokens, ["pq", "js"], [0.5, 0.5], 256, 8, 0, 1, seed=0)
    loader.next_batch()
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return (time.perf_counter() - start) / batches * 1e3


def demo_step_ms(steps: int = 5) -> float:
    """Median wall time of one training step of the `demo` model as configs/demo.toml runs it."""
    import dataclasses

    import torch

    from atoll.model import Llama, get_size, lm_loss

    torch.manual_seed(0)
    args = dataclasses.replace(get_size("demo"), max_seq_len=256)
    model = Llama(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, args.vocab_size, (8, 257))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    import torch

    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = documents(args.mb)
        write_corpus(root, docs)
        tokenizer = train_bpe(docs[: max(1, len(docs) // 20)], args.vocab, root / "tokenizer.json")
        specs = [SourceSpec("pq", str(root / "pq")), SourceSpec("js", str(root / "js" / "*.jsonl.gz"))]
        settings = PrepareSettings(str(root / "tokenizer.json"), 0.01, 1 << 22, "error")
        print(f"corpus: {2 * args.mb:.0f} MB of text ({len(docs)} documents x 2 formats, {FILES_PER_FORMAT} files each), "
              f"BPE of {tokenizer.vocab_size} ids; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        print(f"\n{'tokenisation (same files, same tokenizer)':<44}{'tokens':>12}{'tokens/s':>12}", flush=True)
        rates = {}
        for workers in (1, 2):
            rates[workers], tokens = prepare_rate(specs, root / f"prep{workers}", settings, workers)
            print(f"{f'atoll data prepare, {workers} worker(s)':<44}{tokens:>12,}{rates[workers]:>12,.0f}", flush=True)
        plain, plain_tokens = datasets_map_rate(root, root / "tokenizer.json", root / "hf-cache")
        print(f"{'datasets.load_dataset + map(batched=True)':<44}{plain_tokens:>12,}{plain:>12,.0f}")
        print(f"prepare / datasets.map: {rates[1] / plain:.2f}x (1 worker), {rates[2] / plain:.2f}x (2 workers)", flush=True)
        ms = loader_ms(root / "prep1", tokenizer, args.batches)
        step = demo_step_ms()
        print(f"\n{'per batch (demo shape: 8 x 256 tokens)':<44}{'ms':>12}{'share of step':>18}")
        print(f"{'MixtureLoader.next_batch (memory-mapped)':<44}{ms:>12.3f}{ms / step:>17.2%}")
        print(f"{'demo model step (fwd + bwd + AdamW, CPU)':<44}{step:>12.1f}{1:>17.0%}")
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end: other processes share them)")


if __name__ == "__main__":
    main()
