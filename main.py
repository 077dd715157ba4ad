r"""Runs an experiment graph: the built-in CPU default unless --config says otherwise.

python main.py
python main.py --config=configs/default.py:smoke --workdir=/tmp/smoke
python main.py --config=configs/paper_1b.py:musicpile-chempile --workdir=gs://... --dry_run
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from retention_jax import experiment, sharding
from retention_jax.analysis import figures, report

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (path[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Run directories, results and figures.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (nodes, tokens, FLOPs) and exit.")
_ONLY = flags.DEFINE_string("only", "", "Run only these nodes: comma-separated ids or stages.")
_DEVICES = flags.DEFINE_integer(
    "devices", 0, "With --dry_run: validate for this many devices (default: the config's mesh)."
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # progress lines are printed; libraries stay quiet
    sharding.initialize_distributed()
    rows = experiment.run(
        _CONFIG.value,
        _WORKDIR.value,
        dry_run=_DRY_RUN.value,
        only=_ONLY.value,
        devices=_DEVICES.value or None,
    )
    if rows and jax.process_index() == 0:
        print(report.table(rows))
        print(report.format_summary(report.summary(rows)))
        for path in figures.draw_all(_WORKDIR.value):
            print("figure:", path)


if __name__ == "__main__":
    app.run(main)
