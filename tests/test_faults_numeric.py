"""Numeric faults: `nan@inner:N` and `scale@inner:N:F` on one of three islands.

The real runs (`atoll simulate`, debug model, H = 4, 16 steps, hard timeouts, no process left
behind) check that the bad island's contribution is rejected identically on every island, that
every island finishes in step with finite weights, and that the final validation loss stays
within 3% of the same run without faults.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_elastic import assert_live_islands_agree, simulate

from atoll.errors import UserError
from atoll.faults import FAULTS_ENV, Fault, FaultInjector, parse_faults
from atoll.simulate import Scenario

STEPS = 16
EVAL_AT_END = ["--eval.every", str(STEPS)]


def test_nan_and_scale_faults_parse_and_round_trip():
    faults = parse_faults("nan@inner:6, scale@inner:12:100")
    assert faults == [Fault("nan", "inner", 6), Fault("scale", "inner", 12, 100.0)]
    assert parse_faults(",".join(f.to_text() for f in faults)) == faults


@pytest.mark.parametrize("text", ["scale@inner:8", "scale@inner:8:x", "nan@inner:6:2", "kill@inner:3:4", "nan@outer:2"])
def test_malformed_numeric_faults_are_user_errors(text):
    with pytest.raises(UserError):
        parse_faults(text)


def test_a_scenario_file_scripts_numeric_faults(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[fault]]\nisland = "island-2"\naction = "scale"\nat = "inner:8:100"\n')
    assert Scenario.parse(path, ["island-1=nan@inner:6"], []).faults == {
        "island-2": [Fault("scale", "inner", 8, 100.0)], "island-1": [Fault("nan", "inner", 6)],
    }


def test_the_injector_corrupts_the_weights_at_the_scripted_step(monkeypatch):
    model = torch.nn.Linear(3, 3)
    original = model.weight.detach().clone()
    monkeypatch.setenv(FAULTS_ENV, "scale@inner:2:10,nan@inner:3")
    injector = FaultInjector(True, model)
    injector.at("inner", 1)
    assert torch.equal(model.weight, original)
    injector.at("inner", 2)
    torch.testing.assert_close(model.weight.detach(), original * 10)
    injector.at("inner", 3)
    assert torch.isnan(model.weight).all() and torch.isnan(model.bias).all()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def test_a_nan_island_and_a_scaled_island_are_rejected_alike_and_the_run_matches_a_clean_one(tmp_path, cache_dir):
    clean = simulate(tmp_path / "clean", cache_dir, 3, STEPS, extra=EVAL_AT_END)
    faulty = simulate(tmp_path / "faulty", cache_dir, 3, STEPS, faults=["island-1=nan@inner:6", "island-2=scale@inner:12:100"], extra=EVAL_AT_END)

    assert_live_islands_agree(clean)
    assert all(r["rejected"] == [] for records in clean.values() for r in records)
    steps = assert_live_islands_agree(faulty)  # every island, the bad ones too, logged every outer step alike
    assert all(len(records) == STEPS // 4 for records in faulty.values())
    for records in faulty.values():
        assert [r["rejected"] for r in records] == [[], ["island-1"], ["island-2"], []]
        assert [r["contribution_norms"]["island-1"] is None for r in records] == [False, True, False, False]
    norms = steps[3]["contribution_norms"]
    assert norms["island-2"] > 100 * max(norms["island-0"], norms["island-1"])
    # island-1's NaN weights skipped inner steps 7 and 8, then the outer step 2 overwrote them
    assert [r["skipped_inner"] for r in faulty["island-1"]] == [0, 2, 2, 2]
    assert all(r["skipped_inner"] == 0 for name in ("island-0", "island-2") for r in faulty[name])
    # finite pseudo-gradients at the last outer step: finite inner and outer weights on every island
    assert all(norm is not None for norm in steps[4]["contribution_norms"].values())
    final = [records[-1] for records in faulty.values()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]) and r["val_loss"] == final[0]["val_loss"] for r in final)
    clean_val = clean["island-0"][-1]["val_loss"]
    assert abs(final[0]["val_loss"] - clean_val) / clean_val < 0.03
