r"""Runs an experiment graph: the built-in CPU default unless --config says otherwise.

python main.py
python main.py --config=configs/default.py:smoke --workdir=/tmp/smoke
python main.py --config=configs/paper_1b.py:musicpile-chempile --workdir=gs://... --only=prepare
python main.py --config=configs/paper_1b.py:musicpile-chempile --workdir=gs://... --dry_run
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from retention_jax import callbacks, experiment, sharding
from retention_jax.analysis import figures, report

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (path[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Run directories, results and figures.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (nodes, tokens, FLOPs) and exit.")
_ONLY = flags.DEFINE_string(
    "only", "", "Run only these nodes (comma-separated ids or stages), or 'prepare': the data."
)
_RETRY = flags.DEFINE_bool("retry_failed", False, "Rerun nodes that failed in an earlier run.")
_DEVICES = flags.DEFINE_integer(
    "devices", 0, "With --dry_run: validate for this many devices (default: the config's mesh)."
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # progress lines are printed; libraries stay quiet
    if _ONLY.value != experiment.PREPARE:  # the prepare step needs no devices
        sharding.initialize_distributed()
    failed = None
    try:
        rows = experiment.run(
            _CONFIG.value,
            _WORKDIR.value,
            dry_run=_DRY_RUN.value,
            only=_ONLY.value,
            devices=_DEVICES.value or None,
            retry_failed=_RETRY.value,
        )
    except callbacks.Preempted as e:
        print(e, flush=True)
        sys.exit(callbacks.EXIT_PREEMPTED)
    except experiment.DiskFull as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(experiment.EXIT_DISK_FULL)
    except experiment.GraphFailed as e:
        failed, rows = e, e.rows
    if rows and jax.process_index() == 0:
        print(report.table(rows))
        print(report.format_summary(report.summary(rows)))
        paths = figures.draw_all(_WORKDIR.value)
        workdir = _WORKDIR.value
        print(f"results: {os.path.join(workdir, experiment.RESULTS)}")
        names = ", ".join(os.path.basename(p) for p in paths)
        print(f"figures: {names} in {os.path.join(workdir, 'figures')}")
        print(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'runs')}")
    if failed is not None:
        print(failed, file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
