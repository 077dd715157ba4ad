"""benchmarks/device.sh runs its whole suite on the CPU in tiny mode and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_suite_tiny_writes_json(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)  # one CPU device, this checkout
    subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "device.sh"), str(tmp_path), "--tiny"],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
        stdout=sys.stderr,
    )
    with open(tmp_path / "device.json") as f:
        report = json.load(f)
    assert report["backend"] == "cpu" and report["devices"] == 1
    combos = {(r["attention"], r["remat"]) for r in report["runs"]}
    assert combos == {(a, r) for a in ("einsum", "einsum_vjp", "xla") for r in ("none", "full")}
    for run in report["runs"]:
        assert "error" not in run, run
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1.5
        assert run["argument_gib"] > 0 and run["temp_gib"] > 0
        assert run["tokens_per_s"] == pytest.approx(2 * 64 / run["step_s"])
    ops = report["profiles"]["tiny"]["top_ops"]
    assert len(ops) == 12 and all(op["ms_per_step"] > 0 for op in ops)
    assert sum(op["share"] for op in ops) <= 1.0 + 1e-9
