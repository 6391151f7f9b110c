"""The `atoll` command line: train, coordinator, simulate, demo, model-info, tokenizer.

User mistakes (bad config key, missing file, wrong value) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from atoll.config import describe_fields, load_config, parse_overrides
from atoll.errors import UserError

if TYPE_CHECKING:
    from atoll.wan.network import EmulatedWan

EXIT_USER_ERROR = 2
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if rest and args.command not in ("train", "simulate", "demo"):
            raise UserError(f"unrecognised arguments: {' '.join(rest)}")
        return args.handler(args, rest)
    except UserError as err:
        print(f"atoll: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atoll", description="Train LLMs across islands of compute.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train one island (one machine, one or more local ranks)",
        usage="atoll train [CONFIG] [--nproc N] [--run-dir DIR] [--resume [latest|PATH]] [--section.key VALUE ...]",
        description="Train one island. Any config key below can be overridden as --section.key VALUE.",
        epilog="config keys:\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--nproc", type=int, default=1, help="local ranks to start with torchrun (default 1)")
    train.add_argument("--run-dir", type=Path, help="run directory (default runs/<train.run_name>-<timestamp>)")
    train.add_argument(
        "--resume", nargs="?", const="latest",
        help="resume from the latest checkpoint of --run-dir, or from a checkpoint or run directory",
    )
    train.add_argument("--coordinator", metavar="HOST:PORT", help="join the run of this coordinator (mesh.coordinator)")
    train.add_argument("--island-id", help="this island's id in the run (mesh.island_id; default hostname-<random>)")
    train.add_argument("--mode", choices=["diloco", "ddp"], help="cross-island sync (mesh.mode; default diloco)")
    train.set_defaults(handler=cmd_train)

    coord = commands.add_parser(
        "coordinator", help="run a coordinator: the rendezvous and membership service of a run",
        description="Run a coordinator. With ATOLL_RUN_TOKEN set, only islands holding the same token may join.",
    )
    coord.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    coord.add_argument("--port", type=int, default=29400, help="port to listen on (default 29400)")
    coord.add_argument("--islands", type=int, required=True, help="islands that must arrive before training starts")
    coord.add_argument("--heartbeat-timeout", type=float, default=10.0, help="seconds without a heartbeat before an island is dropped (default 10)")
    coord.add_argument("--report-grace", type=float, default=0.5, help="seconds to wait for survivors' reports after a failed collective (default 0.5)")
    coord.add_argument("--events", type=Path, help="append the membership event log (JSONL) to this file")
    coord.set_defaults(handler=cmd_coordinator)

    for name, text in (("simulate", "run several islands and a coordinator on this machine"),
                       ("demo", "the demo: 2 islands training the demo model with DiLoCo on this machine")):
        sim = commands.add_parser(name, help=text, usage=f"atoll {name} [options] {'CONFIG ' if name == 'simulate' else ''}[--section.key VALUE ...]")
        sim.add_argument("--islands", type=int, default=2, help="number of islands (default 2)")
        sim.add_argument("--procs-per-island", type=int, default=1, help="local ranks per island (default 1)")
        sim.add_argument("--run-dir", type=Path, help="run directory (default runs/<train.run_name>-<timestamp>)")
        sim.add_argument(
            "--wan-rate", metavar="RATE",
            help="emulate a WAN (needs root): each island in its own network namespace, its link shaped to RATE (e.g. 100mbit, 1gbit)",
        )
        sim.add_argument(
            "--wan-delay", metavar="DELAY",
            help="emulate a WAN (needs root): one-way delay per direction between islands (e.g. 20ms gives a 40 ms round trip)",
        )
        sim.add_argument("--scenario", type=Path, metavar="FILE", help="a TOML scenario of faults and late starts (see atoll.simulate.Scenario)")
        sim.add_argument(
            "--fault", action="append", default=[], metavar="ISLAND=ACTION@POINT:N",
            help="inject a fault: ACTION kill|stop|term|nan|scale at POINT inner:N (after inner step N) or allreduce:S (as outer step S averages); "
            "nan makes the island's weights NaN, scale@POINT:N:F multiplies them by F; e.g. island-1=kill@allreduce:2, island-2=scale@inner:8:100",
        )
        sim.add_argument("--start", action="append", default=[], metavar="ISLAND@OUTER", help="start an island (new or returning) once outer step OUTER is logged, e.g. island-3@2")
        sim.add_argument(
            "--signal", action="append", default=[], metavar="ISLAND=ACTION@OUTER",
            help="send kill|stop|cont to an island's processes once outer step OUTER is logged, e.g. island-1=cont@4",
        )
        sim.set_defaults(handler=cmd_simulate, demo=name == "demo")

    info = commands.add_parser("model-info", help="print shapes and parameter counts of the named model sizes")
    info.add_argument("names", nargs="*", help="sizes to show (default: all)")
    info.set_defaults(handler=cmd_model_info)

    tok = commands.add_parser("tokenizer", help="tokenizer tools")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_commands.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    tok_train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    tok_train.add_argument("--source", default="stdlib", help="corpus: stdlib, a directory or a text file")
    tok_train.add_argument("--val-fraction", type=float, default=0.05, help="held-out fraction (not trained on)")
    tok_train.add_argument("--out", type=Path, default=Path("tokenizer.json"), help="output tokenizer.json path")
    tok_train.set_defaults(handler=cmd_tokenizer_train)
    return parser


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    args.config, rest = split_config_arg(rest)
    for flag, key in (("coordinator", "mesh.coordinator"), ("island_id", "mesh.island_id"), ("mode", "mesh.mode")):
        if getattr(args, flag) is not None:
            rest = [*rest, f"--{key}", getattr(args, flag)]
    cfg = load_config(args.config, parse_overrides(rest))
    from atoll.launch import default_run_dir, run_torchrun, under_torchrun

    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    run_dir = args.run_dir
    if run_dir is None and args.resume not in (None, "latest"):
        run_dir = run_dir_of(Path(args.resume))
    if run_dir is None and args.resume == "latest":
        raise UserError("--resume latest needs --run-dir of the run to continue")
    if args.nproc > 1 and not under_torchrun():
        run_dir = run_dir or default_run_dir(cfg.train.run_name)
        passthrough = [*([args.config] if args.config else []), *rest, "--run-dir", str(run_dir)]
        if args.resume is not None:
            passthrough += ["--resume", args.resume]
        return run_torchrun(args.nproc, passthrough)

    from atoll.train import train

    train(cfg, run_dir, args.resume)
    return 0


def cmd_coordinator(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.mesh.auth import run_token
    from atoll.mesh.coordinator import Coordinator

    if args.islands < 1:
        raise UserError(f"--islands must be at least 1, got {args.islands}")
    if args.heartbeat_timeout <= 0 or args.report_grace <= 0:
        raise UserError("--heartbeat-timeout and --report-grace must be positive")
    try:
        coordinator = Coordinator(args.host, args.port, args.islands, args.heartbeat_timeout, args.report_grace, args.events, run_token(None))
    except RuntimeError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({str(err).splitlines()[0]}): choose another --port") from None
    print(f"atoll: coordinator listening on {coordinator.address}, waiting for {args.islands} island(s); Ctrl-C stops it", flush=True)
    coordinator.serve()
    return 0


def cmd_simulate(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.launch import default_run_dir
    from atoll.simulate import Scenario, simulate, summarize

    if args.demo:
        config = str(DEMO_CONFIG)
        if not DEMO_CONFIG.is_file():
            raise UserError(f"atoll demo needs {DEMO_CONFIG}: run it from a clone of the atoll repository")
    else:
        config, rest = split_config_arg(rest)
    if args.islands < 1 or args.procs_per_island < 1:
        raise UserError("--islands and --procs-per-island must be at least 1")
    scenario = Scenario.parse(args.scenario, args.fault, args.start, args.signal)
    wan = emulated_wan(args)
    cfg = load_config(config, parse_overrides(rest))
    run_dir = args.run_dir or default_run_dir(cfg.train.run_name)
    code = simulate(config, rest, args.islands, args.procs_per_island, run_dir, wan, cfg.mesh, scenario)
    if code == 0:
        who = "the surviving islands" if scenario.faults or scenario.starts or scenario.signals else f"all {args.islands} islands"
        print(f"atoll: {who} finished; run dir {run_dir}")
        print(summarize(run_dir))
    return code


def emulated_wan(args: argparse.Namespace) -> EmulatedWan | None:
    """The emulated WAN that --wan-rate/--wan-delay ask for (not started), or None without them."""
    if args.wan_rate is None and args.wan_delay is None:
        return None
    from atoll.wan.namespaces import require_privileges
    from atoll.wan.network import EmulatedWan
    from atoll.wan.units import parse_delay, parse_rate

    rate = parse_rate(args.wan_rate) if args.wan_rate is not None else None
    delay = parse_delay(args.wan_delay) if args.wan_delay is not None else 0.0
    require_privileges()
    return EmulatedWan(args.islands, rate, delay)


def split_config_arg(rest: list[str]) -> tuple[str | None, list[str]]:
    """(config file, overrides): the config is the first bare argument, if any.

    Done by hand because argparse would take an override's value for an optional positional.
    """
    if rest and not rest[0].startswith("-"):
        return rest[0], rest[1:]
    return None, rest


def run_dir_of(checkpoint_or_run: Path) -> Path:
    """The run directory a --resume path belongs to (runs/x/checkpoints/step-N -> runs/x)."""
    if checkpoint_or_run.parent.name == "checkpoints":
        return checkpoint_or_run.parent.parent
    return checkpoint_or_run


def cmd_model_info(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.metrics import flops_per_token
    from atoll.model import SIZES, count_params

    names = args.names or list(SIZES)
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise UserError(f"unknown model size {unknown[0]!r}: choose from {', '.join(SIZES)}")
    header = f"{'size':<16}{'layers':>7}{'dim':>6}{'heads':>6}{'kv':>4}{'ffn':>7}{'vocab':>8}{'seq':>6}{'params':>16}{'non-embed':>16}{'GFLOP/token':>13}"
    print(header)
    for name in names:
        a = SIZES[name]
        counts = count_params(a)
        gflops = flops_per_token(a, counts["non_embedding"], a.max_seq_len) / 1e9
        print(f"{name:<16}{a.n_layers:>7}{a.dim:>6}{a.n_heads:>6}{a.n_kv_heads:>4}{a.ffn_hidden:>7}{a.vocab_size:>8}"
              f"{a.max_seq_len:>6}{counts['total']:>16,}{counts['non_embedding']:>16,}{gflops:>13.3f}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.data import load_documents, train_bpe

    if args.vocab_size < 300:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: byte-level BPE needs at least 300")
    try:
        docs = load_documents(args.source, "train", args.val_fraction)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    tokenizer = train_bpe(docs, args.vocab_size, args.out)
    print(f"atoll: wrote {args.out} ({tokenizer.vocab_size} tokens); use it with --data.tokenizer {args.out} "
          f"--model.vocab_size {tokenizer.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
