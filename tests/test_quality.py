"""Quality guard: DiLoCo's validation loss on a short seeded run stays where it was measured.

Two islands train the debug model (paths relative to the repository, where `run_atoll` runs) for 300 steps, once with DiLoCo (int8, the default
outer step) and once data-parallel, on the same seed, data and token budget. The test fails when
either final validation loss moves more than the stored tolerance from the reference figures in
`quality_reference.json`, or when DiLoCo falls further behind data-parallel than the reference
allows. Every run is deterministic for a tree and seed; the tolerance covers what changes without
a change of algorithm (thread count, another CPU's kernels), measured and recorded in the file.

A deliberate change to training (a default, the outer step, the model, the data) moves these
figures: regenerate them in the same commit and say why in its message:

    python tests/test_quality.py --write --tolerance T --measured "how T was measured"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_atoll  # noqa: E402

REFERENCE = Path(__file__).with_name("quality_reference.json")
RUN_TIMEOUT_S = 300
SETTING = [
    "configs/demo.toml", "--model.name", "debug", "--train.seed", "0",
    "--train.steps", "300", "--train.global_batch", "8", "--train.seq_len", "64", "--optim.lr", "3e-3",
    "--schedule.warmup_steps", "30", "--schedule.decay_shape", "sqrt", "--optim.betas", "[0.9, 0.999]", "--diloco.inner_steps", "25", "--comm.codec", "int8",
    "--eval.every", "300", "--eval.batches", "16", "--metrics.log_every", "100", "--checkpoint.at_end", "false",
]
"""The demo's optimizer and WSD schedule (with the sqrt decay it had when the reference was
measured) on the debug model, at benchmarks/convergence.py's AdamW beta2: 300 steps of 8 x 64
tokens per island."""
MODES = {"diloco": ["--mesh.mode", "diloco"], "ddp": ["--mesh.mode", "ddp"]}


def final_val_loss(mode: str, run_dir: Path, extra: list[str] = ()) -> float:
    """Island-0's final validation loss of a two-island `atoll simulate` run in `mode`."""
    args = ["simulate", "--islands", "2", "--run-dir", str(run_dir), *SETTING, *MODES[mode],
            "--data.cache_dir", str(run_dir.parent / "cache"), *extra]
    result = run_atoll(args, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "island-0" / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_diloco_and_data_parallel_val_loss_stay_at_their_reference(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    got = {mode: final_val_loss(mode, tmp_path / mode) for mode in MODES}
    tolerance = reference["tolerance"]
    for mode, value in got.items():
        want = reference["val_loss"][mode]
        assert abs(value / want - 1) <= tolerance, (
            f"{mode} val_loss {value:.4f} moved {value / want - 1:+.2%} from the reference {want:.4f} "
            f"(tolerance {tolerance:.2%}); a deliberate change regenerates {REFERENCE.name} (see this module)")
    gap = got["diloco"] / got["ddp"] - 1
    assert gap <= reference["gap"] + tolerance, (
        f"DiLoCo is {gap:+.2%} behind data-parallel, the reference {reference['gap']:+.2%} (tolerance {tolerance:.2%})")


def write_reference(tolerance: float, measured: str) -> None:
    """Run both modes here and store their figures with the command that made them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        got = {mode: final_val_loss(mode, Path(tmp) / mode) for mode in MODES}
    REFERENCE.write_text(json.dumps({
        "command": "python tests/test_quality.py --write --tolerance T --measured ...",
        "setting": SETTING,
        "val_loss": got,
        "gap": got["diloco"] / got["ddp"] - 1,
        "tolerance": tolerance,
        "tolerance_measured": measured,
    }, indent=1) + "\n")
    print(json.dumps(got))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"run both modes and write {REFERENCE.name}")
    parser.add_argument("--tolerance", type=float, required=True, help="relative move allowed, as measured")
    parser.add_argument("--measured", required=True, help="how the tolerance was measured (stored with it)")
    options = parser.parse_args()
    if options.write:
        write_reference(options.tolerance, options.measured)
