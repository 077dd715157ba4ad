"""What a run shows its user: every scalar and final evaluation in TensorBoard, the
parameter overview, a profile on request, the prepare step's ETA; no TensorFlow or
PyTorch in a training process."""

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from configs import default
from retention_jax import data, experiment, stage
from retention_jax import model as model_lib
from retention_jax.data import prep

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard's own loader is the reference reader",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loaded(run_dir: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard's Python loader shows a run directory."""
    acc = event_accumulator.EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    assert all(len(out[t]) == len(acc.Scalars(t)) for t in out)  # each step once
    return out


def _runs(workdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, "runs", "*-*")))


def test_every_logged_scalar_and_final_evaluation_is_in_tensorboard(smoke_workdir):
    runs = _runs(smoke_workdir)
    assert len(runs) == 21
    zero_step = 0
    for run_dir in runs:
        shown = loaded(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = [json.loads(x) for x in f]
        for line in lines:
            for tag, value in line.items():
                if tag != "step":
                    assert shown[tag][line["step"]] == pytest.approx(value, rel=1e-6), tag
        result = stage.read_result(run_dir)
        for d in data.DOMAINS:
            final = shown[f"final/{d}"]
            assert final == {result["result_step"]: pytest.approx(result["val"][d], rel=1e-6)}
        logged = {t for line in lines for t in line} - {"step"}
        assert set(shown) == logged | {f"final/{d}" for d in data.DOMAINS}
        zero_step += result["steps"] == 0
    assert zero_step == 1  # compute-matched at λ = 1: stage 1 saw the whole pool


def test_pretraining_has_a_validation_curve(smoke_workdir):
    """Every domain at each ckpt.every (16) before the last step; final/ holds the last."""
    curves = []
    for run_dir in _runs(smoke_workdir):
        if os.path.basename(run_dir).startswith("pretrain"):
            shown = loaded(run_dir)
            steps = {t: sorted(shown[t]) for t in shown if t.startswith("val/")}
            assert steps["val/pre"] == steps["val/post"] == steps["val/ft"]
            curves.append((stage.read_result(run_dir)["steps"], steps["val/pre"]))
    assert sorted(curves) == [(32, [16]), (33, [16, 32]), (33, [16, 32])]


def test_parameter_overview_lists_the_models_parameters(smoke_workdir):
    c = default.get_config("smoke")
    from retention_jax import config

    expected = model_lib.count_params(config.parse(c, 8).model)
    assert expected == 853_120
    for run_dir in _runs(smoke_workdir):
        with open(os.path.join(run_dir, stage.PARAMETERS)) as f:
            lines = f.read().splitlines()
        rows = [x.split("|") for x in lines if x.startswith("| ") and "Name" not in x]
        assert sum(int(r[4].replace(",", "")) for r in rows) == expected
        assert lines[-1] == f"Total: {expected:,} -- {4 * expected:,} bytes"
        assert rows[0][1].strip() == "embed" and rows[0][5].strip() == "('tensor', 'fsdp')"


def test_profile_traces_the_window_into_the_run_directory(smoke_run, tmp_path):
    """A fine-tuning node rerun with profile.steps=(2, 3): one trace, in its own directory."""
    workdir, rt = smoke_run
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy)
    c = default.get_config("smoke")
    leaf = next(n for n in experiment.expand(c) if n.stage == "finetune")
    shutil.rmtree(os.path.join(copy, "runs", leaf.id))
    c.profile.steps = (2, 3)
    experiment.run(c, copy, rt=rt, only=leaf.id)
    traces = glob.glob(os.path.join(copy, "runs", "*", "plugins", "profile", "*", "*"))
    assert {
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(p)))) for p in traces
    } == {os.path.join(copy, "runs", leaf.id)}
    kinds = sorted(os.path.basename(p).split(".", 1)[1] for p in traces)
    assert kinds == ["json.gz", "trace.json.gz", "xplane.pb"]  # perfetto_trace, <host>.*
    (perfetto,) = [p for p in traces if p.endswith("perfetto_trace.json.gz")]
    with gzip.open(perfetto) as f:
        events = json.load(f)["traceEvents"]
    assert sum(e.get("ph") == "X" for e in events) > 100  # complete events: the steps' ops


def test_training_process_imports_neither_tensorflow_nor_torch(tmp_path):
    """Everything a training process imports and runs to instrument itself."""
    code = f"""
import sys
import jax, numpy as np
import main
from retention_jax import experiment, stage, runtime, tensorboard
from clu import parameter_overview
w = tensorboard.SummaryWriter({str(tmp_path)!r})
w.write_scalars(1, {{"loss": 1.0}}); w.write_text(1, "t", "x"); w.close()
parameter_overview.get_parameter_overview({{"w": np.zeros(3)}}, include_stats="sharding")
jax.profiler.start_trace({str(tmp_path)!r}, create_perfetto_trace=True)
jax.numpy.ones(3).block_until_ready()
jax.profiler.stop_trace()
print(sorted({{"tensorflow", "torch", "tensorboardX"}} & set(sys.modules)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "[]"


def test_prepare_progress_shows_an_eta(capsys):
    p = prep._Progress("preparing", 100)
    p.start = time.monotonic() - 10.0  # 25 sequences in 10 s: 2.5/s, 75 left
    p.draw(25, end="\n")
    assert capsys.readouterr().out.strip().endswith("25/100 sequences, 2/s, ETA 30s")
