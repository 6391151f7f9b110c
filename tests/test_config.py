"""Config tests: override parsing, TOML loading, one-line errors naming the key, round trips, --help."""

import dataclasses
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from atoll.cli import build_parser, main, split_config_arg
from atoll.config import (
    JobConfig,
    OptimConfig,
    ScheduleConfig,
    SourceConfig,
    TrainConfig,
    describe_fields,
    dump_config,
    load_config,
    parse_overrides,
)
from atoll.data import ByteTokenizer
from atoll.errors import UserError
from atoll.fingerprint import job_fingerprint
from atoll.mesh.membership import fingerprint_mismatch
from atoll.model import get_size

CONFIG_DIR = Path(__file__).parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.toml"))


def user_error(path: str | Path | None, overrides: dict | None = None) -> str:
    """The message of the UserError that load_config raises; fails the test if it raises none."""
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"error message spans lines: {message!r}"
    return message


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- parse_overrides ---------------------------------------------------------------------------

def test_override_value_may_follow_as_next_argument_or_after_equals():
    assert parse_overrides(["--train.run_name", "demo"]) == {"train.run_name": "demo"}
    assert parse_overrides(["--train.run_name=demo"]) == {"train.run_name": "demo"}
    assert parse_overrides(["--train.steps", "5", "--optim.lr=0.5"]) == {"train.steps": 5, "optim.lr": 0.5}


def test_equals_form_splits_at_the_first_equals_only():
    assert parse_overrides(["--data.source=a=b"]) == {"data.source": "a=b"}


def test_override_values_are_typed_as_toml_literals():
    parsed = parse_overrides([
        "--train.steps", "50",
        "--optim.lr", "3e-4",
        "--optim.eps=1e-8",
        "--model.compile", "true",
        "--checkpoint.at_end=false",
        "--optim.betas", "[0.9, 0.95]",
        "--model.name", "intellect-1-10b",
        "--train.seed", "-3",
        "--train.run_name", '"2024"',
    ])
    assert parsed == {
        "train.steps": 50,
        "optim.lr": 0.0003,
        "optim.eps": 1e-8,
        "model.compile": True,
        "checkpoint.at_end": False,
        "optim.betas": [0.9, 0.95],
        "model.name": "intellect-1-10b",
        "train.seed": -3,
        "train.run_name": "2024",
    }
    assert type(parsed["train.steps"]) is int
    assert type(parsed["optim.lr"]) is float
    assert type(parsed["model.compile"]) is bool


def test_override_without_value_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"--train\.steps needs a value"):
        parse_overrides(["--optim.lr", "1", "--train.steps"])


@pytest.mark.parametrize(("args", "culprit"), [
    (["stray"], "stray"),
    (["--optim.lr", "1", "stray"], "stray"),
    (["--"], "--"),
    (["-x", "1"], "-x"),
])
def test_positional_or_malformed_argument_is_an_error_naming_it(args, culprit):
    with pytest.raises(UserError, match="unexpected argument") as info:
        parse_overrides(args)
    assert repr(culprit) in str(info.value)


def test_override_key_without_section_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"unknown option --steps"):
        parse_overrides(["--steps", "5"])


# --- load_config -------------------------------------------------------------------------------

def test_defaults_load_without_a_file():
    assert load_config(None) == JobConfig()


def test_file_values_are_loaded_and_overrides_win(tmp_path):
    path = write(tmp_path, """
[optim]
lr = 1e-3
weight_decay = 0.05

[train]
steps = 40
run_name = "from-file"
""")
    cfg = load_config(path, {"optim.lr": 2e-3, "train.seed": 7})
    assert cfg.optim.lr == 2e-3  # override beats the file
    assert cfg.optim.weight_decay == 0.05  # file value kept beside an override in the same section
    assert cfg.train.steps == 40
    assert cfg.train.run_name == "from-file"
    assert cfg.train.seed == 7  # override of a key the file does not set
    assert cfg.schedule == ScheduleConfig()  # untouched section keeps its defaults


def test_repo_ships_the_documented_configs():
    assert {p.stem for p in CONFIG_FILES} >= {"debug", "demo", "150m", "1b", "intellect-1-10b"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_repo_config_loads_and_names_a_real_model_size(path):
    from atoll.model import SIZES

    cfg = load_config(path)
    assert cfg.model.name == path.stem
    assert cfg.model.name in SIZES
    assert cfg.train.run_name == path.stem
    assert cfg.schedule.warmup_steps <= cfg.train.steps


def test_intellect_config_keeps_its_published_hyperparameters():
    cfg = load_config(CONFIG_DIR / "intellect-1-10b.toml")
    assert cfg.optim.lr == 7.5e-5
    assert cfg.optim.betas == (0.9, 0.95)
    assert (cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seq_len) == (128, 1, 8192)
    assert cfg.train.z_loss_weight == 2e-4
    assert (cfg.schedule.kind, cfg.schedule.decay_shape) == ("wsd", "sqrt")
    assert (cfg.diloco.outer_lr, cfg.diloco.outer_momentum, cfg.diloco.plain_average_fraction) == (0.7, 0.9, 0.0)


# --- errors name the key -----------------------------------------------------------------------

def test_unknown_key_in_file_names_it_and_suggests_the_near_miss(tmp_path):
    path = write(tmp_path, "[optim]\nlrr = 1e-3\n")
    message = user_error(path)
    assert "'optim.lrr'" in message
    assert "did you mean optim.lr?" in message
    assert str(path) in message


def test_unknown_key_from_override_names_the_flag():
    message = user_error(None, {"optim.lrr": 1})
    assert message == "unknown config key 'optim.lrr' (in --optim.lrr): did you mean optim.lr?"


def test_unknown_key_without_near_miss_points_to_help():
    message = user_error(None, {"train.zzzzzz": 1})
    assert "'train.zzzzzz'" in message
    assert "atoll train --help" in message


def test_unknown_section_names_it_and_suggests_the_real_one(tmp_path):
    path = write(tmp_path, "[optimizer]\nlr = 1e-3\n")
    message = user_error(path)
    assert "'optimizer'" in message
    assert "did you mean optim?" in message


def test_override_below_a_value_is_an_error_naming_the_key(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1e-3\n")
    with pytest.raises(UserError, match=r"cannot set --optim\.lr\.x: 'lr' is a value"):
        load_config(path, {"optim.lr.x": 1})


def test_wrong_type_names_key_flag_and_value():
    message = user_error(None, parse_overrides(["--train.steps", "abc"]))
    assert message.startswith("config key 'train.steps' (in --train.steps): ")
    assert "valid integer" in message
    assert message.endswith("got 'abc'")


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path, '[train]\nsteps = "many"\n')
    message = user_error(path)
    assert f"config key 'train.steps' (in {path})" in message


@pytest.mark.parametrize(("args", "key", "bound"), [
    (["--optim.lr", "-1"], "optim.lr", "greater than 0"),
    (["--optim.lr", "0"], "optim.lr", "greater than 0"),
    (["--schedule.decay_fraction", "2"], "schedule.decay_fraction", "less than or equal to 1"),
    (["--schedule.min_lr_ratio=-0.1"], "schedule.min_lr_ratio", "greater than or equal to 0"),
    (["--train.steps", "0"], "train.steps", "greater than 0"),
    (["--data.val_fraction", "1"], "data.val_fraction", "less than 1"),
])
def test_out_of_range_value_names_key_and_bound(args, key, bound):
    message = user_error(None, parse_overrides(args))
    assert message.startswith(f"config key '{key}' (in --{key}): ")
    assert bound in message


def test_betas_must_be_a_pair():
    message = user_error(None, parse_overrides(["--optim.betas", "[0.9]"]))
    assert "'optim.betas'" in message


def test_warmup_longer_than_training_is_a_cross_field_error():
    message = user_error(None, {"schedule.warmup_steps": 101})
    assert "schedule.warmup_steps (101) exceeds train.steps (100)" in message
    assert load_config(None, {"schedule.warmup_steps": 100, "schedule.kind": "cosine"}).schedule.warmup_steps == 100


def test_wsd_warmup_must_end_before_the_decay_phase():
    message = user_error(None, {"schedule.warmup_steps": 81})
    assert "schedule.warmup_steps (81) runs into the decay phase, which starts at step 80" in message
    assert load_config(None, {"schedule.warmup_steps": 80}).schedule.warmup_steps == 80


def test_micro_batch_larger_than_global_batch_is_a_cross_field_error(tmp_path):
    path = write(tmp_path, "[train]\nglobal_batch = 4\nmicro_batch = 8\n")
    message = user_error(path)
    assert "train.micro_batch (8) exceeds train.global_batch (4)" in message
    assert load_config(path, {"train.micro_batch": 4}).train.micro_batch == 4


def test_missing_config_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nosuch.toml"
    message = user_error(missing)
    assert str(missing) in message
    assert "not found" in message


def test_directory_given_as_config_file_is_an_error_naming_it(tmp_path):
    assert str(tmp_path) in user_error(tmp_path)


def test_malformed_toml_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path, "[optim\nlr = 1e-3\n", name="broken.toml")
    message = user_error(path)
    assert str(path) in message
    assert "not valid TOML" in message


# --- dump_config round trip --------------------------------------------------------------------

def test_dumped_config_loads_back_equal(tmp_path):
    cfg = load_config(CONFIG_DIR / "demo.toml", {
        "optim.betas": [0.8, 0.99],
        "optim.grad_clip": 0.0,
        "schedule.kind": "cosine",
        "schedule.min_lr_ratio": 0.1,
        "train.micro_batch": 4,
        "train.device": "cpu",
        "model.rope_theta": 500000.0,
        "metrics.peak_flops": 1.5e14,
        "data.cache_dir": "",
    })
    assert cfg.optim.betas == (0.8, 0.99)
    path = tmp_path / "resolved.toml"
    dump_config(cfg, path)
    reloaded = load_config(path)
    assert reloaded == cfg
    assert reloaded.optim.betas == (0.8, 0.99)
    assert reloaded.model.vocab_size is None  # None fields are omitted and come back as the default


def test_default_config_round_trips(tmp_path):
    dump_config(JobConfig(), tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == JobConfig()


# --- documentation -----------------------------------------------------------------------------

def test_every_field_of_every_section_is_listed_with_a_description():
    text = describe_fields()
    for section_name, section_field in JobConfig.model_fields.items():
        assert f"[{section_name}]" in text
        for name, field in section_field.annotation.model_fields.items():
            assert field.description, f"{section_name}.{name} has no description"
            assert f"--{section_name}.{name} (default {field.default!r})" in text
            assert field.description in text


def test_per_island_keys_are_real_fields_and_help_marks_them():
    text = describe_fields()
    for section_name, section_field in JobConfig.model_fields.items():
        section = section_field.annotation
        assert section.per_island <= set(section.model_fields), f"{section_name}.per_island names no field"
        for name in section.per_island:
            assert f"--{section_name}.{name} (default {section.model_fields[name].default!r}) per island" in text
    assert SourceConfig.per_island == {"path", "format"} and "--optim.lr (default 0.0003)\n" in text


def fingerprint_of(cfg: JobConfig) -> dict:
    args = dataclasses.replace(get_size(cfg.model.name), vocab_size=cfg.model.vocab_size or get_size(cfg.model.name).vocab_size)
    return job_fingerprint(cfg, args, ByteTokenizer(), cfg.train.seq_len or args.max_seq_len)


def test_the_join_check_covers_every_run_wide_setting_and_no_per_island_one():
    run = load_config(None, {"train.seq_len": 64})
    same = load_config(None, {
        "train.seq_len": 64, "train.micro_batch": 2, "train.device": "cpu", "eval.every": 7, "checkpoint.keep": 9,
        "data.cache_dir": "/elsewhere", "mesh.island_id": "paris", "mesh.coordinator": "10.0.0.1:29400",
        "metrics.log_every": 5, "model.compile": True, "mesh.heartbeat_interval_s": 1.0,
    })
    assert fingerprint_mismatch(fingerprint_of(run), fingerprint_of(same)) == []
    differs = load_config(None, {"train.seq_len": 64, "optim.lr": 1e-3, "train.z_loss_weight": 2e-4, "schedule.min_lr_ratio": 0.1,
                                 "mesh.outer_attempts": 5, "comm.streams": 2})
    assert fingerprint_mismatch(fingerprint_of(run), fingerprint_of(differs)) == [
        "comm.streams: run has 1, island has 2",
        "mesh.outer_attempts: run has 3, island has 5",
        "optim.lr: run has 0.0003, island has 0.001",
        "schedule.min_lr_ratio: run has 0.0, island has 0.1",
        "train.z_loss_weight: run has 0.0, island has 0.0002",
    ]
    # a setting left to the model size and the same value set explicitly resolve alike
    explicit = load_config(None, {"train.seq_len": 64, "model.vocab_size": get_size("debug").vocab_size})
    assert fingerprint_mismatch(fingerprint_of(run), fingerprint_of(explicit)) == []


def test_a_mixtures_sources_are_compared_by_name_weight_and_content_not_path():
    def mixture(path: str, weight: float) -> JobConfig:
        return load_config(None, {"data.sources": [{"name": "web", "path": path, "weight": weight}, {"name": "code", "path": "c"}]})

    assert fingerprint_mismatch(fingerprint_of(mixture("/a/web", 1.0)), fingerprint_of(mixture("/b/web", 1.0))) == []
    assert fingerprint_mismatch(fingerprint_of(mixture("/a/web", 1.0)), fingerprint_of(mixture("/a/web", 2.0))) == [
        "data.sources.web.weight: run has 1.0, island has 2.0"]


def test_sections_reject_unknown_keys_on_construction_and_assignment():
    with pytest.raises(ValueError):
        OptimConfig(lrr=1.0)
    cfg = TrainConfig()
    with pytest.raises(ValueError):
        cfg.steps = -1


# --- argument order ------------------------------------------------------------------------------

def test_override_value_is_not_taken_as_the_config_path():
    args, rest = build_parser().parse_known_args(["train", "--train.steps", "5"])
    assert split_config_arg(rest) == (None, ["--train.steps", "5"])
    args, rest = build_parser().parse_known_args(["train", "--nproc", "2", "configs/debug.toml", "--train.steps", "5"])
    assert args.nproc == 2
    assert split_config_arg(rest) == ("configs/debug.toml", ["--train.steps", "5"])


def test_string_key_accepts_a_number_like_override():
    cfg = load_config(None, parse_overrides(["--train.run_name", "2024", "--data.source", "1e3"]))
    assert cfg.train.run_name == "2024"
    assert cfg.data.source == "1e3"


# --- the CLI as a user sees it -----------------------------------------------------------------
# Two cases run as real processes (exit status, stderr, no traceback); the rest call cli.main()
# in-process, which is what `python -m atoll.cli` runs, to keep this file fast (each fresh
# interpreter spends seconds importing torch).

SUBPROCESS_CASES = {
    "unknown_key": ["train", "--optim.lrr", "1"],
    "help": ["train", "--help"],
}


@pytest.fixture(scope="module")
def cli():
    """Run the subprocess cases once, concurrently."""
    def run(argv):
        return subprocess.run([sys.executable, "-m", "atoll.cli", *argv],
                              capture_output=True, text=True, timeout=60, check=False)

    with ThreadPoolExecutor(len(SUBPROCESS_CASES)) as pool:
        return dict(zip(SUBPROCESS_CASES, pool.map(run, SUBPROCESS_CASES.values())))


def run_main(argv: list[str], capsys) -> subprocess.CompletedProcess:
    """cli.main(argv) in-process, shaped like a subprocess result."""
    code = main(argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def assert_one_line_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("atoll: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_cli_unknown_key_exits_2_with_one_line(cli):
    assert_one_line_user_error(cli["unknown_key"], "optim.lrr")
    assert cli["unknown_key"].stdout == ""


def test_cli_train_help_documents_config_keys(cli):
    result = cli["help"]
    assert result.returncode == 0, result.stderr
    assert "--optim.lr (default 0.0003)" in result.stdout
    assert OptimConfig.model_fields["lr"].description in result.stdout
    assert "--schedule.decay_fraction" in result.stdout


def test_cli_unknown_key_after_config_file_suggests_the_real_key(capsys):
    result = run_main(["train", str(CONFIG_DIR / "debug.toml"), "--optim.lrr", "1"], capsys)
    assert_one_line_user_error(result, "'optim.lrr'", "did you mean optim.lr?")


def test_cli_missing_config_file_exits_2_with_one_line(capsys):
    result = run_main(["train", "nosuch-config.toml"], capsys)
    assert_one_line_user_error(result, "nosuch-config.toml", "not found")


def test_cli_bad_value_exits_2_naming_the_flag(capsys):
    result = run_main(["train", str(CONFIG_DIR / "debug.toml"), "--optim.lr", "-1"], capsys)
    assert_one_line_user_error(result, "'optim.lr'", "(in --optim.lr)", "greater than 0")


def test_cli_model_info_prints_intellect_parameter_count(capsys):
    result = run_main(["model-info", "intellect-1-10b"], capsys)
    assert result.returncode == 0, result.stderr
    assert "10,211,381,248" in result.stdout
    assert result.stderr == ""


def test_cli_unknown_model_size_exits_2_with_one_line(capsys):
    result = run_main(["model-info", "nosuch"], capsys)
    assert_one_line_user_error(result, "'nosuch'", "intellect-1-10b")
    assert result.stdout == ""
