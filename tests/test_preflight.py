"""Fail-early checks: writable work directory, free disk for checkpoints."""

import os
import shutil

import pytest

from retention_jax import preflight


def test_writable_workdir_is_created_and_left_clean(tmp_path):
    workdir = tmp_path / "a" / "b"
    preflight.check_writable(str(workdir))
    assert workdir.is_dir() and os.listdir(workdir) == []


def test_unwritable_workdir_names_the_path_and_the_remedy(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    workdir = str(blocker / "runs")
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_writable(workdir)
    msg = str(e.value)
    assert msg.startswith(f"workdir {workdir} is not writable (")
    assert "pass a --workdir this job can create files in" in msg


def test_checkpoint_bytes_counts_params_and_adam_moments():
    # latest + best kept on 13 checkpointing nodes
    assert preflight.checkpoint_bytes(134_515_008, keep=2, nodes=13) == 134_515_008 * 12 * 26
    assert preflight.checkpoint_bytes(1000, keep=1, nodes=1) == 12_000


def test_free_space_passes_at_the_limit_and_fails_past_it(tmp_path):
    workdir = str(tmp_path / "not" / "yet" / "there")  # measured on the nearest existing parent
    free = shutil.disk_usage(tmp_path).free
    fits = free // 24  # keep=2, nodes=1: 24 bytes per parameter, well under what is free
    need, seen = preflight.check_free_space(workdir, params=fits // 2, keep=2, nodes=1)
    assert need == (fits // 2) * 24 and seen > 0
    too_many = free // 12 + 10**9  # more than the disk holds, even if others free some
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_free_space(workdir, params=too_many, keep=1, nodes=1)
    msg = str(e.value)
    assert f"workdir {workdir}: the planned checkpoints need" in msg
    assert f"1 nodes × 1 steps × {too_many:,} params × 12 bytes" in msg
    assert "pass a --workdir on a larger disk" in msg


def test_free_space_on_an_object_store_returns_the_estimate_only():
    assert preflight.check_free_space("gs://bucket/x", params=10, keep=2, nodes=3) == (720, None)


def test_free_space_rejects_bad_counts():
    with pytest.raises(ValueError, match="preflight keep=-1: allowed an integer >= 0"):
        preflight.check_free_space("/tmp", params=10, keep=-1, nodes=1)


def test_check_runs_every_check(tmp_path):
    preflight.check(
        str(tmp_path / "w"),
        params=1000,
        keep=2,
        nodes=8,
    )
    assert os.listdir(tmp_path / "w") == []
