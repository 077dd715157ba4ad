r"""Launches an experiment graph with XManager, one job per node, stage by stage.

  pip install -e ".[xm]"
  python xm_launch/launch.py --config=configs/paper_135m.py:musicpile-chempile \
      --workdir=gs://BUCKET/135m-mc --accelerator=TPU_V3 --count=8

Every node of a stage runs as its own job (`main.py --only=<node id>`), all nodes of a
stage in parallel, a stage starting when the one above has finished; a last job, with
every node finished, writes results.jsonl and the figures. `--config.KEY=VALUE`
overrides reach every job. `--dry_run` prints the job waves and launches nothing (no
XManager needed).
"""

import asyncio
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retention_jax import config, experiment  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Shared work directory (gs://...).", required=True)
_ACCELERATOR = flags.DEFINE_string("accelerator", "TPU_V3", "xm.JobRequirements accelerator.")
_COUNT = flags.DEFINE_integer("count", 8, "Accelerators per job.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job waves only.")


def waves(cfg) -> list[list[str]]:
    """Node ids per stage: each wave depends only on the waves before it."""
    nodes = experiment.expand(cfg)
    return [[n.id for n in nodes if n.stage == s] for s in config.STAGES]


def _install() -> str:
    """The job's install line: JAX for the accelerator the jobs request."""
    if _ACCELERATOR.value.upper().startswith("TPU"):
        return "pip install -e . 'jax[tpu]'"
    return "pip install -e '.[cuda]'"


async def _launch(plan: list[list[str]], config_args: list[str]) -> None:
    from xmanager import xm, xm_local

    with xm_local.create_experiment(experiment_title=os.path.basename(_WORKDIR.value)) as xp:
        [executable] = xp.package(
            [
                xm.python_container(
                    executor_spec=xm_local.Vertex.Spec(),
                    path=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    entrypoint=xm.CommandList([_install(), "python main.py $@"]),
                )
            ]
        )
        requirements = xm.JobRequirements(**{_ACCELERATOR.value: _COUNT.value})
        common = [*config_args, f"--workdir={_WORKDIR.value}"]
        for wave in [*plan, [""]]:  # the last wave: nothing left to train, collect only
            units = [
                await xp.add(
                    xm.Job(
                        executable,
                        executor=xm_local.Vertex(requirements=requirements),
                        args=[*common, f"--only={node}"] if node else common,
                    )
                )
                for node in wave
            ]
            await asyncio.gather(*(u.wait_until_complete() for u in units))


def main(argv) -> None:
    del argv
    plan = waves(_CONFIG.value)
    for name, wave in zip(config.STAGES, plan):
        print(f"{name}: {len(wave)} jobs: {' '.join(wave)}")
    if _DRY_RUN.value:
        return
    config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
    asyncio.run(_launch(plan, config_args))


if __name__ == "__main__":
    app.run(main)
