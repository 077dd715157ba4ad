"""The XManager launcher's plan: one job per node, in stage waves (no XManager needed)."""

import importlib.util
import os

from configs import default
from retention_jax import experiment

_PATH = os.path.join(os.path.dirname(__file__), "..", "xm_launch", "launch.py")


def test_waves_follow_the_graph():
    spec = importlib.util.spec_from_file_location("launch", _PATH)
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    c = default.get_config("smoke")
    plan = launch.waves(c)
    assert [len(w) for w in plan] == [2, 2, 4]
    nodes = {n.id: n for n in experiment.expand(c)}
    for parents, children in zip(plan, plan[1:]):
        assert {nodes[i].parent.id for i in children} == set(parents)
