r"""Launches an experiment graph with XManager on Vertex AI, one job per node, stage by stage.

  pip install -e ".[xm]"
  python xm_launch/launch.py --config=configs/paper_135m.py:musicpile-chempile \
      --workdir=gs://BUCKET/135m-mc --accelerator=TPU_V3 --count=8

A first job prepares the data (`main.py --only=prepare`: every token store the graph
reads, in the work directory). Then every node of a stage runs as its own job
(`main.py --only=<node id>`, reading those stores), all nodes of a stage in parallel,
a stage starting when the one above has finished; a last job, with every node
finished, writes results.jsonl and the figures. `--config.KEY=VALUE`
overrides reach every job. `--dry_run` prints the job waves and launches nothing.

Accelerators (what Vertex AI offers through `xm_local.Vertex`, one host per job):
GPUs P4, T4, P100, V100, A100, A100_80GIB, L4_24TH, H100, H200, B200, and the
single-host TPUs TPU_V2 and TPU_V3 (8 cores). TPU pod slices (v4, v5e, v5p, v6e, any
multi-host slice) are not available this way: run them with xm_launch/tpu_vm.sh. On a TPU,
every program of the graph is first compiled here for the host's chips (deviceless, with
libtpu from the tpu extra: `main.py --dry_run --topology`); a program that does not
compile or fit their HBM stops the launch before any job exists.
"""

import asyncio
import dataclasses
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from retention_jax import config, experiment, graph, topology  # noqa: E402

GPUS = ("P4", "T4", "P100", "V100", "A100", "A100_80GIB", "L4_24TH", "H100", "H200", "B200")
TPUS = ("TPU_V2", "TPU_V3")
TPU_CORES = 8  # a Vertex AI TPU_V2 / TPU_V3 host
SLICES = {"TPU_V2": "v2-8", "TPU_V3": "v3-8"}  # the host as gcloud names it

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Shared work directory (gs://...).", required=True)
_ACCELERATOR = flags.DEFINE_string("accelerator", "TPU_V3", "One of: " + ", ".join(GPUS + TPUS))
_COUNT = flags.DEFINE_integer("count", 8, "Accelerators per job.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11-slim", "Image the jobs build on.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job waves only.")


@dataclasses.dataclass(frozen=True)
class Job:
    node: str  # "prepare" (wave 0: the data), the node it trains, or "" (collect results)
    args: tuple[str, ...]


def waves(cfg) -> list[list[str]]:
    """Node ids per stage: each wave depends only on the waves before it."""
    nodes = experiment.expand(cfg)
    return [[n.id for n in nodes if n.stage == s] for s in config.STAGES]


def jobs(cfg, workdir: str, config_args: list[str]) -> list[list[Job]]:
    """The job waves: the prepare step, one job per node stage by stage, then one
    collect-only job."""
    common = (*config_args, f"--workdir={workdir}")
    prep = [Job(graph.PREPARE, (*common, f"--only={graph.PREPARE}"))]
    plan = [[Job(n, (*common, f"--only={n}")) for n in wave] for wave in waves(cfg)]
    return [prep, *plan, [Job("", common)]]


def check_accelerator(accelerator: str, count: int) -> str:
    """The accelerator's canonical name; refuses what Vertex AI cannot give one job."""
    name = accelerator.upper()
    if name not in GPUS + TPUS:
        hint = "; TPU pod slices run with xm_launch/tpu_vm.sh" if name.startswith("TPU") else ""
        raise ValueError(
            f"flag --accelerator={accelerator}: allowed {', '.join(GPUS + TPUS)}{hint}"
        )
    if name in TPUS and count != TPU_CORES:
        raise ValueError(
            f"flag --count={count}: a {name} host has {TPU_CORES} cores; allowed {TPU_CORES} "
            "(larger TPU slices run with xm_launch/tpu_vm.sh)"
        )
    if count < 1:
        raise ValueError(f"flag --count={count}: allowed a positive number of {name}")
    return name


def docker_instructions(accelerator: str) -> list[str]:
    """Copies the checkout and installs the package within xm_launch/constraints.txt."""
    jax = "'jax[tpu]'" if accelerator in TPUS else "'.[cuda]'"
    return [
        f"COPY {os.path.basename(_ROOT)}/ /retention_jax",
        "WORKDIR /retention_jax",
        f"RUN pip install -q -c xm_launch/constraints.txt -e . {jax}",
    ]


def packageable(accelerator: str, base_image: str):
    """The image every job runs: the checkout on `base_image`, entry point main.py."""
    from xmanager import xm, xm_local

    return xm.python_container(
        executor_spec=xm_local.Vertex.Spec(),
        path=_ROOT,
        base_image=base_image,
        docker_instructions=docker_instructions(accelerator),
        entrypoint=xm.CommandList(["python main.py $@"]),
    )


def executor(accelerator: str, count: int):
    """A Vertex AI executor requesting `count` of `accelerator` for one job."""
    from xmanager import xm, xm_local

    return xm_local.Vertex(requirements=xm.JobRequirements(**{accelerator.lower(): count}))


async def _launch(plan: list[list[Job]], accelerator: str, count: int, base_image: str) -> None:
    from xmanager import xm, xm_local

    with xm_local.create_experiment(experiment_title=os.path.basename(_WORKDIR.value)) as xp:
        [executable] = xp.package([packageable(accelerator, base_image)])
        for wave in plan:
            units = [
                await xp.add(xm.Job(executable, executor(accelerator, count), args=list(j.args)))
                for j in wave
            ]
            await asyncio.gather(*(u.wait_until_complete() for u in units))


def main(argv) -> None:
    del argv
    accelerator = check_accelerator(_ACCELERATOR.value, _COUNT.value)
    if accelerator in TPUS:  # before any job: refuses a config that does not compile or fit
        topology.cpu_host()
        topology.check(_CONFIG.value, SLICES[accelerator])
    config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
    plan = jobs(_CONFIG.value, _WORKDIR.value, config_args)
    for name, wave in zip([graph.PREPARE, *config.STAGES, "collect"], plan):
        print(f"{name}: {len(wave)} jobs: {' '.join(j.node or 'results' for j in wave)}")
    if _DRY_RUN.value:
        return
    asyncio.run(_launch(plan, accelerator, _COUNT.value, _BASE_IMAGE.value))


if __name__ == "__main__":
    app.run(main)
