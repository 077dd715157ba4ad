r"""Runs an experiment graph: the built-in CPU default unless --config says otherwise.

python main.py
python main.py --config=configs/default.py:smoke --workdir=/tmp/smoke
python main.py --config=configs/paper_1b.py:musicpile-chempile --workdir=gs://... --only=prepare
python main.py --config=configs/paper_1b.py:musicpile-chempile --workdir=gs://... --dry_run
python main.py --config=configs/paper_1b.py:musicpile-chempile --dry_run --topology=v5p-64
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from retention_jax import errors

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def _user_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER)


def _config_error(e: Exception, argv: list[str]) -> None:
    """A bad `--config` or `--config.KEY=VALUE` (config_flags raises plain errors) in one
    line, unless --verbose."""
    if "--verbose" in argv:
        raise e
    cause = e.__cause__ or e
    given = [a for a in argv[1:] if a.startswith("--config")]
    _user_error(f"{' '.join(given) or '--config'}: {type(cause).__name__}: {cause}")


try:  # config_flags applies the default file's --config.KEY overrides right here
    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/default.py", "Experiment config file (path[:variant]).", lock_config=True
    )
except Exception as e:
    _config_error(e, sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Run directories, results and figures.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (nodes, tokens, FLOPs) and exit.")
_ONLY = flags.DEFINE_string(
    "only", "", "Run only these nodes (comma-separated ids or stages), or 'prepare': the data."
)
_RETRY = flags.DEFINE_bool("retry_failed", False, "Rerun nodes that failed in an earlier run.")
_DEVICES = flags.DEFINE_integer(
    "devices", 0, "With --dry_run: validate for this many devices (default: the config's mesh)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    "",
    "With --dry_run: compile every program for this Cloud TPU slice (v5p-64, v5litepod-16, "
    "v4-32, v6e-8) on this host, print per-chip memory and FLOPs, fail if one does not fit.",
)

_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the traceback of a user error (a bad config value, path or file)."
)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with `--help` answered (status 0) before any config loads and a bad
    `--config.KEY=VALUE` named in one line (status EXIT_USER)."""
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + flags.FLAGS.main_module_help())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a config file that raised: its traceback is in the text
        lines = [line for line in str(e).splitlines() if line.strip()]
        if "--verbose" in argv or len(lines) < 2:
            _user_error(str(e))
        _user_error(f"{lines[0]} {lines[-1]}")
    except Exception as e:
        _config_error(e, argv)


def main(argv):
    """Runs `_run`, printing a user error as one line and Ctrl-C as what is kept."""
    del argv
    try:
        _run()
    except errors.UserError as e:
        if _VERBOSE.value:
            raise
        _user_error(str(e))
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished nodes, committed data shards and every node's last "
            "checkpoint are kept; rerun the same command to resume.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_INTERRUPTED)


def _run() -> None:
    import jax  # imported here: `--help` and flag errors answer without loading jax

    from retention_jax import callbacks, config, experiment, graph, sharding, tensorboard, topology
    from retention_jax.analysis import figures, report

    logging.set_verbosity(logging.WARNING)  # progress lines are printed; libraries stay quiet
    try:  # a file that failed to load is a stand-in that raises on first use
        cfg = _CONFIG.value
        cfg.get("sweep")
    except Exception as e:
        _config_error(e, sys.argv)
    cfg, notes = config.pin(cfg, config_flags.get_override_values(flags.FLAGS["config"]))
    for line in notes:
        print(line, flush=True)
    if _TOPOLOGY.value:  # before anything else runs; needs no TPU (the tpu extra)
        if not _DRY_RUN.value:
            raise app.UsageError("--topology compiles without running: add --dry_run")
        topology.cpu_host()
        topology.check(cfg, _TOPOLOGY.value)
    if _ONLY.value != graph.PREPARE:  # the prepare step needs no devices
        sharding.initialize_distributed()
    if _DRY_RUN.value:
        devices = _DEVICES.value if _DEVICES.present else None
        experiment.dry_run(cfg, only=_ONLY.value, devices=devices)
        return
    failed = None
    try:
        rows = experiment.run(cfg, _WORKDIR.value, only=_ONLY.value, retry_failed=_RETRY.value)
    except callbacks.Preempted as e:
        print(e, flush=True)
        sys.exit(callbacks.EXIT_PREEMPTED)
    except experiment.DiskFull as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(experiment.EXIT_DISK_FULL)
    except experiment.GraphFailed as e:
        failed, rows = e, e.rows
    if rows and jax.process_index() == 0:
        workdir = _WORKDIR.value
        print(report.table(rows))
        s = report.write_summary(workdir, rows)
        text = report.format_summary(s)
        print(text)
        tensorboard.write_summary(os.path.join(workdir, "runs", "summary"), report.to_json(s), text)
        paths = figures.draw_all(workdir)
        print(f"results: {os.path.join(workdir, experiment.RESULTS)}")
        print(f"summary: {os.path.join(workdir, report.SUMMARY)}")
        names = ", ".join(os.path.basename(p) for p in paths)
        print(f"figures: {names} in {os.path.join(workdir, 'figures')}")
        print(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'runs')}")
    if failed is not None:
        print(failed, file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
