"""The `atoll` command line: train, coordinator, status, simulate, demo, report, data prepare, export, eval, sample, model-info, tokenizer.

User mistakes (bad config key, missing file, wrong value) print one line and exit with status 2;
the other expected failures of a run (lost coordinator, dropped, ...) print one line and exit with
their code from `atoll.errors`. `atoll --debug` adds their tracebacks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from atoll import __version__
from atoll.config import JobConfig, describe_fields, load_config, parse_overrides
from atoll.errors import DEBUG_ENV, USER_ERROR, ExpectedFailure, UserError, say
from atoll.logs import FORMATS, LEVELS, configure
from atoll.logs import info as log_line

if TYPE_CHECKING:
    from atoll.wan.network import EmulatedWan

EXIT_USER_ERROR = USER_ERROR
SIMULATE_DESCRIPTIONS = {
    "simulate": "Run a coordinator and N islands on this machine, each an `atoll train` of CONFIG (plus overrides) joined to "
                "the coordinator, their output prefixed by island id; optionally over an emulated WAN and with scripted "
                "faults. Each island writes RUN_DIR/island-<i>/; a summary per island ends the run.",
    "demo": "The demo: a coordinator and 2 islands train the `demo` model (3.4M parameters) with DiLoCo on the Python "
            "standard library, about 3 minutes on 2 CPU cores; the options of `atoll simulate`, with configs/demo.toml. "
            "It writes runs/demo-<timestamp>/ (about 131 MB) and caches the tokenized corpus in ~/.cache/atoll.",
}
SCENARIO_HELP = """\
scenario file (--scenario FILE), TOML; any of these tables, each repeatable:
  [[fault]]                    # the island fires it itself
  island = "island-1"
  action = "kill"              # kill (-9), stop (SIGSTOP), term (SIGTERM: a clean leave), nan, scale,
                               # skew (outer weights), sleep, break (every later all-reduce fails)
  at = "allreduce:2"           # as outer step 2's all-reduce starts; "inner:N": after inner step N;
                               # "serve:C": as its C-th chunk to a joiner is sent; scale and sleep
                               # add their factor or seconds: "inner:8:100"
  [[start]]                    # start an island once any island logged an outer step
  island = "island-3"          # a new id, or one that left (it comes back)
  after_outer = 2
  [[signal]]                   # sent by the launcher once any island logged an outer step
  island = "island-1"
  action = "cont"              # kill, stop or cont
  after_outer = 4
--fault, --start and --signal add to the file's entries."""
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
LOG_ROLES = {"coordinator": "coordinator", "simulate": "simulate", "demo": "demo"}
"""Who a command's log lines name until an island names itself (`atoll.logs.set_island`)."""
RESULT_COMMANDS = frozenset({"status", "token", "export", "eval", "sample", "report", "model-info"})
"""Commands whose standard output is their result (text, a table, JSON): their log lines go to stderr."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # the ranks and islands it starts inherit it
    configure(args.log_level, args.log_format, LOG_ROLES.get(args.command), to_stderr=args.command in RESULT_COMMANDS)
    try:
        if rest and args.command not in ("train", "simulate", "demo", "eval", "data"):
            raise UserError(f"unrecognised arguments: {' '.join(rest)}")
        return args.handler(args, rest)
    except ExpectedFailure as err:
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        say(err)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def logging_flags() -> argparse.ArgumentParser:
    """--debug, --log-level and --log-format, accepted after every command too (atoll train --log-level debug)."""
    flags = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given before the command is kept when it is not repeated after it
    flags.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of expected failures too (exit codes: README)")
    flags.add_argument("--log-level", choices=LEVELS, default=argparse.SUPPRESS,
                       help="log lines at this level and above (default info; the processes it starts inherit it)")
    flags.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS,
                       help="text: UTC time to the ms, level, island/local rank, message; json: one object a line (default text)")
    return flags


def command(group: argparse._SubParsersAction, name: str, **kwargs: object) -> argparse.ArgumentParser:
    """A subcommand that takes the logging flags."""
    return group.add_parser(name, parents=[logging_flags()], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atoll", description="Train LLMs across islands of compute.")
    parser.add_argument("--version", action="version", version=f"atoll {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of expected failures too (exit codes: README)")
    parser.add_argument("--log-level", choices=LEVELS, help="log lines at this level and above (default info)")
    parser.add_argument("--log-format", choices=FORMATS, help="text or json log lines (default text)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = command(commands,
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
    train.add_argument("--init-from", metavar="HF_DIR", help="start from a Hugging Face Llama's weights (model.init_from), e.g. an `atoll export`")
    train.add_argument("--print-config", action="store_true", help="print the resolved config (file + overrides) as TOML and exit")
    train.set_defaults(handler=cmd_train)

    coord = command(commands,
        "coordinator", help="run a coordinator: the membership and rendezvous service of a run",
        description=(
            "Run a coordinator. Islands join with `atoll train --coordinator HOST:PORT`. Every message is authenticated "
            "under the run token (ATOLL_RUN_TOKEN; `atoll token` prints a fresh one); on a non-loopback address a token is "
            "required unless --insecure. With --journal, its decisions survive a restart: start it again with the same "
            "journal and the run continues. It exits 0 once the run has ended."
        ),
    )
    coord.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; use the host's address to accept islands)")
    coord.add_argument("--port", type=int, default=29400, help="port of the coordinator's service (default 29400)")
    coord.add_argument("--islands", type=int, required=True, help="islands that must arrive before training starts")
    coord.add_argument("--heartbeat-timeout", type=float, default=10.0, help="seconds without a heartbeat before an island is dropped (default 10)")
    coord.add_argument("--report-grace", type=float, default=0.5, help="seconds to wait for survivors' reports after a failed collective (default 0.5)")
    coord.add_argument("--evict-after", type=int, default=3, help="failed epochs in a row with the same members before the culprit is evicted (default 3)")
    coord.add_argument("--events", type=Path, help="append the membership event log (JSONL) to this file")
    coord.add_argument("--journal", type=Path, help="the durable journal of decisions (default: --events with suffix .journal; none without --events)")
    coord.add_argument("--stay", action="store_true", help="keep serving after the run has ended")
    coord.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a run token (anyone who reaches it can join)")
    coord.add_argument(
        "--public-status", action="store_true",
        help="serve /status, /status.json and /metrics to anyone who reaches the port (default: open on loopback only; "
        "elsewhere they need the status key, which `atoll status` derives from ATOLL_RUN_TOKEN)",
    )
    coord.set_defaults(handler=cmd_coordinator)

    status = command(commands,
        "status", help="print a running coordinator's status table (what its /status page shows)",
        description="Print the run as the coordinator at HOST:PORT sees it: the epoch, every island with its state, "
                    "last outer step, losses, tokens/s, utilization, bytes sent, the age of its last heartbeat and its "
                    "address; the recent membership events and refused requests. Off loopback it authenticates with the "
                    "status key derived from ATOLL_RUN_TOKEN (read-only).",
    )
    status.add_argument("address", metavar="HOST:PORT", help="the coordinator's address (what islands pass as --coordinator)")
    status.add_argument("--json", action="store_true", help="print /status.json instead of the table")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="print it again every SECONDS until Ctrl-C")
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="give up on an answer after this long (default 5)")
    status.set_defaults(handler=cmd_status)

    token = command(commands, "token", help="print a fresh run token (export it as ATOLL_RUN_TOKEN on the coordinator and every island)")
    token.set_defaults(handler=cmd_token)

    for name, text in (("simulate", "run several islands and a coordinator on this machine"),
                       ("demo", "the demo: 2 islands training the demo model with DiLoCo on this machine")):
        sim = command(commands,
            name, help=text, description=textwrap.fill(SIMULATE_DESCRIPTIONS[name], 100), epilog=SCENARIO_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            usage=f"atoll {name} [options] {'CONFIG ' if name == 'simulate' else ''}[--section.key VALUE ...]",
        )
        sim.add_argument("--islands", type=int, default=2, help="number of islands (default 2)")
        sim.add_argument("--procs-per-island", type=int, default=1, help="local ranks per island (default 1)")
        sim.add_argument("--run-dir", type=Path, help="run directory (default runs/<train.run_name>-<timestamp>)")
        sim.add_argument(
            "--resume", action="store_true",
            help="continue the stopped run in --run-dir: a new coordinator, every island resumed from its newest verified "
            "checkpoint; the run goes on from the newest outer step any island saved",
        )
        sim.add_argument(
            "--wan-rate", metavar="RATE",
            help="emulate a WAN (needs root): each island in its own network namespace, its link shaped to RATE (e.g. 100mbit, 1gbit)",
        )
        sim.add_argument(
            "--wan-delay", metavar="DELAY",
            help="emulate a WAN (needs root): one-way delay per direction between islands (e.g. 20ms gives a 40 ms round trip)",
        )
        sim.add_argument(
            "--wan-topology", type=Path, metavar="FILE",
            help="emulate a WAN (needs root) with a rate and one-way delay per directed pair of islands, from a TOML file: "
            '[regions] eu = [0, 1] ...; [within] and [between] rate = "50mbit", delay = "40ms"; [[pair]] from, to, rate, '
            "delay override one direction (see atoll/wan/topology.py); instead of --wan-rate/--wan-delay",
        )
        sim.add_argument("--scenario", type=Path, metavar="FILE", help="a TOML file of faults, late starts and signals (format below)")
        sim.add_argument(
            "--fault", action="append", default=[], metavar="ISLAND=ACTION@POINT:N",
            help="inject a fault: ACTION kill|stop|term|nan|scale|skew|sleep|break at POINT inner:N (after inner step N), allreduce:S (as outer step S averages) or serve:C (as the C-th chunk to a joiner is about to be sent); "
            "nan makes the island's weights NaN, scale@POINT:N:F multiplies them by F, skew moves its outer weights, sleep@POINT:N:F stalls it F s, "
            "break makes its every all-reduce fail from then on; e.g. island-1=kill@allreduce:2, island-2=scale@inner:8:100",
        )
        sim.add_argument("--start", action="append", default=[], metavar="ISLAND@OUTER", help="start an island (new or returning) once outer step OUTER is logged, e.g. island-3@2")
        sim.add_argument(
            "--signal", action="append", default=[], metavar="ISLAND=ACTION@OUTER",
            help="send kill|stop|cont to an island's processes once outer step OUTER is logged, e.g. island-1=cont@4",
        )
        sim.set_defaults(handler=cmd_simulate, demo=name == "demo")

    export = command(commands,
        "export", help="write a run's model as a Hugging Face Llama directory (safetensors, config, tokenizer)",
        description="Write the model of a run (its latest checkpoint) or of one checkpoint as a directory that "
                    "transformers' AutoModelForCausalLM and AutoTokenizer load with from_pretrained. From a DiLoCo run "
                    "it writes the outer weights of the last committed outer step, which all islands share.",
    )
    export.add_argument("source", type=Path, metavar="RUN_DIR|CHECKPOINT", help="a run directory or a checkpoints/step-N directory")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="the directory to write (must not exist or be empty)")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights' dtype in the files (default fp32)")
    export.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="split the weights into safetensors files of at most SIZE (e.g. 5GB, 500MB), with an index (default 5GB)")
    export.set_defaults(handler=cmd_export)

    evaluate = command(commands,
        "eval", help="print a model's validation loss and perplexity",
        usage="atoll eval RUN_DIR|HF_DIR [CONFIG] [--section.key VALUE ...]",
        description="Print the validation loss and perplexity of a run's model (its latest checkpoint; the outer "
                    "weights of a DiLoCo run) or of a Hugging Face Llama directory, on the batches training evaluates: "
                    "the first eval.batches unshuffled global batches (train.global_batch x train.seq_len; 0: all) of the "
                    "validation split of data.source, or of each of data.sources (a mixture: one loss per source, "
                    "then their mean under the mixture's weights). A run uses its own config.toml, so the losses compare "
                    "with val_loss (and val_loss_by_source) in its metrics.jsonl; CONFIG and --section.key overrides "
                    "change the data and batches; data.tokenizer must be the model's tokenizer.",
    )
    evaluate.add_argument("model", type=Path, metavar="RUN_DIR|HF_DIR", help="a run, checkpoint or Hugging Face model directory")
    evaluate.set_defaults(handler=cmd_eval)

    sample = command(commands,
        "sample", help="print a model's continuation of a prompt",
        description="Print PROMPT and the model's continuation of it: a run's model (its latest checkpoint) or a "
                    "Hugging Face Llama directory, on the CPU (or CUDA when available).",
    )
    sample.add_argument("model", type=Path, metavar="RUN_DIR|HF_DIR", help="a run, checkpoint or Hugging Face model directory")
    sample.add_argument("--prompt", default="", help="the text to continue (default: start a new document)")
    sample.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate at most (default 200; eos stops earlier)")
    sample.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy; higher is more random (default 0.8)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0): the same seed gives the same text")
    sample.set_defaults(handler=cmd_sample)
    data = command(commands, "data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prep = command(data_commands,
        "prepare", help="tokenise every source of a mixture into shards that training memory-maps",
        usage="atoll data prepare CONFIG [--workers N] [--no-progress] [--section.key VALUE ...]",
        description="Tokenise each [[data.sources]] of CONFIG once into shards and a manifest under data.prepared "
                    "(a directory or fsspec URL; default <data.cache_dir>/prepared). An interrupted run resumes; "
                    "finished sources are skipped.",
    )
    prep.add_argument("--workers", type=int, help="worker processes (default data.workers)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(handler=cmd_data_prepare)

    report = command(
        commands, "report", help="write one self-contained HTML file of a run's plots",
        description="Write one HTML file (plots embedded, nothing fetched) from a run directory or a simulate/demo directory: "
                    "train and val loss per island against tokens and time, utilization and blocked sync time per outer "
                    "step, bytes per outer step against data-parallel's, world size and membership events over time, "
                    "checkpoint saves and their blocked time, rejected contributions and skipped outer steps, tokens by "
                    "data source. The plotted series are kept in the page as JSON (script#atoll-report-data).",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory or a simulate directory (island-*/)")
    report.add_argument("--out", type=Path, metavar="FILE", help="the HTML file to write (default RUN_DIR/report.html)")
    report.set_defaults(handler=cmd_report)

    info = command(commands, "model-info", help="print shapes and parameter counts of the named model sizes")
    info.add_argument("names", nargs="*", help="sizes to show (default: all)")
    info.set_defaults(handler=cmd_model_info)

    tok = command(commands, "tokenizer", help="tokenizer tools")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = command(tok_commands, "train", help="train a byte-level BPE tokenizer on a corpus")
    tok_train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    tok_train.add_argument("--source", default="stdlib", help="corpus: stdlib, a directory or a text file")
    tok_train.add_argument("--val-fraction", type=float, default=0.05, help="held-out fraction (not trained on)")
    tok_train.add_argument("--out", type=Path, default=Path("tokenizer.json"), help="output tokenizer.json path")
    tok_train.set_defaults(handler=cmd_tokenizer_train)
    return parser


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    args.config, rest = split_config_arg(rest)
    for flag, key in (("coordinator", "mesh.coordinator"), ("island_id", "mesh.island_id"), ("mode", "mesh.mode"),
                      ("init_from", "model.init_from")):
        if getattr(args, flag) is not None:
            rest = [*rest, f"--{key}", getattr(args, flag)]
    cfg = load_config(args.config, parse_overrides(rest))
    if args.print_config:
        print(config_toml(cfg), end="")
        return 0
    from atoll.launch import default_run_dir, generated_island_id, run_torchrun, under_torchrun

    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    run_dir = args.run_dir
    if run_dir is None and args.resume not in (None, "latest") and "://" not in args.resume:
        run_dir = run_dir_of(Path(args.resume))
    if run_dir is None and args.resume == "latest":
        raise UserError("--resume latest needs --run-dir of the run to continue")
    if args.nproc > 1 and not under_torchrun():
        if cfg.mesh.coordinator and not cfg.mesh.island_id:  # chosen once, so the default run dir can name it
            cfg.mesh.island_id = generated_island_id()
            rest = [*rest, "--mesh.island_id", cfg.mesh.island_id]
        run_dir = run_dir or default_run_dir(cfg.train.run_name, cfg.mesh.island_id if cfg.mesh.coordinator else None)
        passthrough = [*([args.config] if args.config else []), *rest, "--run-dir", str(run_dir)]
        if args.resume is not None:
            passthrough += ["--resume", args.resume]
        return run_torchrun(args.nproc, passthrough)

    from atoll.train import train

    train(cfg, run_dir, args.resume)
    return 0


def config_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML, as the run directory's config.toml holds it (None fields omitted)."""
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(exclude_none=True))


def parse_size(text: str) -> int:
    """Bytes of a size like 5GB, 500MB, 64KB or 1000 (decimal units, as Hugging Face's max_shard_size)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    upper = text.strip().upper()
    unit = next((u for u in units if upper.endswith(u)), "B")
    try:
        value = float(upper.removesuffix(unit)) * units[unit]
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"--max-shard-size {text!r}: give a positive size such as 5GB or 500MB")
    return int(value)


def cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.hf.export import export

    report = export(args.source, args.out, args.dtype, parse_size(args.max_shard_size))
    run = report.source
    if report.diloco:
        when = f"outer step {report.outer_step}, " if report.outer_step is not None else ""
        what = (f"the outer weights of the last committed outer step ({when}inner step {run.step}), which all islands share, "
                f"rebuilt from {report.local_ranks} local rank(s)")
    else:
        what = f"the weights at step {run.step}"
    shards = sum(f.endswith(".safetensors") for f in report.files)
    print(f"atoll: exported {what} of {run.checkpoint} to {report.out} ({args.dtype}, {report.total_bytes / 1e6:.1f} MB "
          f"in {shards} safetensors file(s)); load it with transformers' AutoModelForCausalLM.from_pretrained")
    return 0


def resolve_eval_config(run_config: Path | None, rest: list[str]) -> JobConfig:
    """CONFIG (first bare argument) or the run's own config.toml, plus --section.key overrides."""
    config, rest = split_config_arg(rest)
    return load_config(config or run_config, parse_overrides(rest))


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.evaluate import evaluate_model, load_eval_data, pick_device
    from atoll.hf import load_model

    loaded = load_model(args.model)
    cfg = resolve_eval_config(loaded.run_config, rest)
    seq_len = cfg.train.seq_len or loaded.model.args.max_seq_len
    data = load_eval_data(cfg, loaded.tokenizer)
    result = evaluate_model(loaded.model, data, cfg, seq_len, pick_device(cfg.train.device))
    if data.mixture:
        shares = ", ".join(f"{n} {w / sum(data.weights):.0%}" for n, w in zip(data.names, data.weights))
        where = f"the {len(data.names)} data.sources ({shares})"
    else:
        where = f"data.source {cfg.data.source!r}"
    print(f"atoll: {loaded.described}: {result.batches} validation batch(es) of {cfg.train.global_batch}x{seq_len} tokens "
          f"from {where}")
    for name, loss in (result.by_source or {}).items():
        print(f"val_loss_by_source {name} {loss:.4f}  perplexity {math.exp(loss):.2f}")
    # Last, and in the same form with or without a mixture: scripts read this line.
    print(f"val_loss {result.loss:.4f}  perplexity {result.perplexity:.2f}")
    return 0


def cmd_sample(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.evaluate import pick_device
    from atoll.hf import load_model
    from atoll.sample import generate

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be at least 0, got {args.temperature}")
    loaded = load_model(args.model)
    prompt = loaded.tokenizer.encode(args.prompt)
    new = generate(loaded.model, prompt, args.max_new_tokens, args.temperature, loaded.tokenizer.eos_id,
                   loaded.tokenizer.vocab_size, args.seed, pick_device("auto"))
    print(loaded.tokenizer.decode(prompt + new))
    return 0


def cmd_coordinator(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.mesh.auth import TOKEN_ENV, is_loopback, run_token
    from atoll.mesh.coordinator import Coordinator
    from atoll.mesh.journal import replay
    from atoll.mesh.membership import Rules
    from atoll.mesh.status import status_url

    if args.islands < 1:
        raise UserError(f"--islands must be at least 1, got {args.islands}")
    if args.heartbeat_timeout <= 0 or args.report_grace <= 0 or args.evict_after < 1:
        raise UserError("--heartbeat-timeout and --report-grace must be positive, --evict-after at least 1")
    token = run_token(None)
    if token is None and not is_loopback(args.host) and not args.insecure:
        raise UserError(
            f"refusing to listen on {args.host} without a run token: export {TOKEN_ENV}=$(atoll token) here and on every "
            "island, or pass --insecure to let anyone who reaches the port join"
        )
    journal = args.journal or (args.events.with_suffix(".journal") if args.events else None)
    ended = replay(journal).ended if journal else None
    if ended is not None:
        raise UserError(f"the journal {journal} holds a run that has ended ({ended}): remove it, or pass another --journal, to start a new run")
    rules = Rules(args.heartbeat_timeout, args.report_grace, args.evict_after)
    try:
        coordinator = Coordinator(
            args.host, args.port, args.islands, rules, args.events, token, journal,
            log=log_line, public_status=args.public_status,
        )
    except (RuntimeError, OSError) as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({str(err).splitlines()[0]}): choose another --port") from None
    log_line(
        f"atoll: coordinator of run {coordinator.run_id} listening on {coordinator.address}, waiting for {args.islands} island(s); "
        + ("journal " + str(journal) if journal else "no journal: a restart of this coordinator ends the run")
        + ("" if token else "; OPEN run (no token)")
    )
    log_line(f"atoll: status page {status_url(args.host, coordinator.port, None if coordinator.status_open else coordinator.status_key)} "
             f"(or `atoll status {coordinator.address}`)")
    coordinator.serve(stay=args.stay)
    log_line(f"atoll: coordinator done: {coordinator.ended or 'stopped'}")
    return 0


def cmd_status(args: argparse.Namespace, rest: list[str]) -> int:
    import json
    import time

    from atoll.mesh.auth import run_token, status_key
    from atoll.mesh.client import parse_address
    from atoll.mesh.status import read_status, render_text

    host, port = parse_address(args.address)
    if args.timeout <= 0 or (args.watch is not None and args.watch <= 0):
        raise UserError("--timeout and --watch must be positive numbers of seconds")
    key = status_key(run_token(None))
    while True:
        snap = read_status(host, port, key, args.timeout)
        print(json.dumps(snap, indent=2) if args.json else render_text(snap), flush=True)
        if args.watch is None:
            return 0
        time.sleep(args.watch)
        print()


def cmd_token(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.mesh.auth import new_token

    print(new_token())
    return 0


def cmd_simulate(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.launch import default_run_dir
    from atoll.simulate import Scenario, report_command, simulate, summarize, write_summary

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
    if args.resume and args.run_dir is None:
        raise UserError("--resume needs --run-dir of the simulated run to continue")
    run_dir = args.run_dir or default_run_dir(cfg.train.run_name)
    code = simulate(config, rest, args.islands, args.procs_per_island, run_dir, wan, cfg.mesh, scenario, args.resume)
    if code == 0:
        who = "the surviving islands" if scenario.faults or scenario.starts or scenario.signals else f"all {args.islands} islands"
        outcome = f"atoll: {who} finished; run dir {run_dir}"
        print(outcome)
        print(summarize(run_dir))
        written = write_summary(run_dir, outcome)
        print(f"atoll: summary in {written}; plots: {report_command(run_dir)}")
    return code


def emulated_wan(args: argparse.Namespace) -> EmulatedWan | None:
    """The emulated WAN that --wan-rate/--wan-delay or --wan-topology ask for (not started), or None without them."""
    if args.wan_rate is None and args.wan_delay is None and args.wan_topology is None:
        return None
    from atoll.wan.namespaces import require_privileges
    from atoll.wan.network import EmulatedWan
    from atoll.wan.topology import load_topology
    from atoll.wan.units import parse_delay, parse_rate

    if args.wan_topology is not None:
        if args.wan_rate is not None or args.wan_delay is not None:
            raise UserError("--wan-topology gives every pair its rate and delay: drop --wan-rate and --wan-delay")
        topology = load_topology(args.wan_topology, args.islands)
        require_privileges()
        return EmulatedWan(args.islands, None, 0.0, topology)

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


def cmd_data_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.data.pipeline import run_prepare

    config, rest = split_config_arg(rest)
    if config is None:
        raise UserError("atoll data prepare needs a config file listing [[data.sources]], e.g. configs/data/intellect-1.toml")
    cfg = load_config(config, parse_overrides(rest))
    workers = cfg.data.workers if args.workers is None else args.workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    report = run_prepare(cfg.data, workers, progress=not args.no_progress)
    tokens = sum(m["tokens"]["train"] + m["tokens"]["val"] for m in report.manifests.values())
    rate = f", {report.tokens_done / report.seconds:,.0f} tokens/s" if report.tokens_done else " (all already prepared)"
    print(f"atoll: prepared {len(report.manifests)} source(s), {tokens:,} tokens, in {report.seconds:.1f} s{rate}")
    return 0


def cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    from atoll.report import write_report

    out = write_report(args.run_dir, args.out)
    print(f"atoll: wrote {out} ({out.stat().st_size / 1e6:.1f} MB); open it in a browser")
    return 0


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
