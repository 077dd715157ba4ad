"""TensorBoard event files without TensorFlow: values and steps read back; resumes."""

import os
import subprocess
import sys

import pytest

from retention_jax import tensorboard

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard's own loader is the reference reader",
)


def loaded(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's Python loader shows for a run directory."""
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_scalars_read_back(tmp_path):
    w = tensorboard.SummaryWriter(str(tmp_path))
    for step in (1, 2, 5):
        w.write_scalars(step, {"loss": 1.0 / step, "lr": 0.5 * step})
    w.close()
    assert loaded(str(tmp_path)) == {
        "loss": [(1, 1.0), (2, 0.5), (5, pytest.approx(0.2))],
        "lr": [(1, 0.5), (2, 1.0), (5, 2.5)],
    }
    assert tensorboard.read_scalars(str(tmp_path)) == loaded(str(tmp_path))
    assert len(tensorboard.event_files(str(tmp_path))) == 1


def test_flush_is_incremental(tmp_path):
    w = tensorboard.SummaryWriter(str(tmp_path))
    w.write_scalars(1, {"loss": 3.0})
    assert "loss" not in loaded(str(tmp_path))  # queued, not yet written
    w.flush()
    w.write_scalars(2, {"loss": 2.0})
    w.flush()
    assert loaded(str(tmp_path)) == {"loss": [(1, 3.0), (2, 2.0)]}


def test_resume_has_no_duplicated_steps(tmp_path):
    """An attempt logged steps 1..10 and checkpointed at 6; the resumed one re-runs 7..12."""
    first = tensorboard.SummaryWriter(str(tmp_path))
    for step in range(1, 11):
        first.write_scalars(step, {"loss": float(step)})
    first.flush()  # then the job dies: no close
    resumed = tensorboard.SummaryWriter(str(tmp_path), start_step=6)
    for step in range(5, 13):  # steps <= 6 are dropped, not written twice
        resumed.write_scalars(step, {"loss": 100.0 + step})
    resumed.close()
    expected = [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 13)]
    assert loaded(str(tmp_path)) == {"loss": expected}
    assert tensorboard.read_scalars(str(tmp_path)) == {"loss": expected}  # 7..10 once
    assert tensorboard.event_files(str(tmp_path)) == [str(resumed.path)]

    again = tensorboard.SummaryWriter(str(tmp_path), start_step=9)  # a second resume
    again.write_scalars(10, {"loss": -1.0})
    again.close()
    assert loaded(str(tmp_path)) == {"loss": expected[:9] + [(10, -1.0)]}
    assert len(os.listdir(tmp_path)) == 1


def test_interrupted_compaction_is_redone(tmp_path):
    """A job that died before deleting the old file: the next open leaves one copy of each step."""
    first = tensorboard.SummaryWriter(str(tmp_path))
    for step in range(1, 6):
        first.write_scalars(step, {"loss": float(step)})
    first.close()
    kept = first.path.read_bytes()
    resumed = tensorboard.SummaryWriter(str(tmp_path), start_step=3)
    resumed.write_scalars(4, {"loss": 40.0})
    resumed.close()
    (tmp_path / (tensorboard.FILE_PREFIX + "0000000000.old")).write_bytes(kept)  # sorts first
    again = tensorboard.SummaryWriter(str(tmp_path), start_step=4)
    again.write_scalars(5, {"loss": 50.0})
    again.close()
    assert loaded(str(tmp_path)) == {"loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]}
    assert tensorboard.event_files(str(tmp_path)) == [str(again.path)]


def test_truncated_record_ends_the_file(tmp_path):
    w = tensorboard.SummaryWriter(str(tmp_path))
    w.write_scalars(1, {"loss": 1.0})
    w.write_scalars(2, {"loss": 2.0})
    w.close()
    w.path.write_bytes(w.path.read_bytes()[:-5])  # a crash in the middle of the last record
    assert tensorboard.read_scalars(str(tmp_path)) == {"loss": [(1, 1.0)]}
    resumed = tensorboard.SummaryWriter(str(tmp_path), start_step=1)
    resumed.close()
    assert loaded(str(tmp_path)) == {"loss": [(1, 1.0)]}


def test_final_scalars_are_rewritten_by_the_finishing_attempt(tmp_path):
    """Final evaluations name an earlier step than the last one; a rerun replaces them."""
    first = tensorboard.SummaryWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        first.write_scalars(step, {"loss": float(step)})
    first.write_final(2, {"final/post": 0.5})
    first.close()  # then the job dies before its result is written
    again = tensorboard.SummaryWriter(str(tmp_path), start_step=4)
    again.write_final(2, {"final/post": 0.25})
    again.close()
    assert loaded(str(tmp_path)) == {
        "loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)],
        "final/post": [(2, 0.25)],
    }


def test_summary_scalars_and_text(tmp_path):
    old = tensorboard.SummaryWriter(str(tmp_path))
    old.write_scalars(1, {"summary/x": 9.0})
    old.close()
    summary = {"share": {0.5: 0.25, 1.0: float("nan")}, "ft_lr": 1e-3, "ok": True, "name": "a"}
    tensorboard.write_summary(str(tmp_path), summary, "the table")
    assert loaded(str(tmp_path)) == {
        "summary/share/0.5": [(0, 0.25)],
        "summary/ft_lr": [(0, pytest.approx(1e-3))],
        "summary/ok": [(0, 1.0)],
    }
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    (text,) = acc.Tensors("summary")
    assert text.tensor_proto.string_val == [b"```\nthe table\n```"]


def test_imports_neither_tensorflow_nor_torch():
    code = (
        "import sys, tempfile, retention_jax.tensorboard as tb; "
        "w = tb.SummaryWriter(tempfile.mkdtemp()); w.write_text(1, 't', 'x'); w.close(); "
        "assert not {'tensorflow', 'torch', 'tensorboardX'} & set(sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
