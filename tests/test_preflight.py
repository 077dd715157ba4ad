"""Fail-early checks: writable work directory, free disk for checkpoints."""

import os
import shutil

import pytest

from configs import default, paper_1b
from retention_jax import config, experiment, preflight


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


def test_step_memory_counts_state_activations_and_logits():
    model = config.parse_model(paper_1b.get_config().model)  # bf16, remat dots, loss chunks
    need = preflight.step_memory(model, 1_029_917_376, rows=8, seq_len=1024, shards=8)
    assert need["state"] == 1_029_917_376 * (2 * 4 + 8) // 8  # fp32 weights and grads, Adam
    d, f, h = model.d_model, model.d_mlp, model.n_heads
    per_layer = 4 * d + 2 * f + h * 1024  # matmul outputs and attention probabilities
    one_layer = 12 * d + 4 * f + h * 1024
    assert need["activations"] == 8 * 1024 * 2 * (24 * per_layer + one_layer)
    assert need["logits"] == 8 * 256 * 49_152 * 4 * 2
    # Within 10% of what the compiled step lays out (docs: 1.44 + 20.1 GiB per device).
    assert abs(sum(need.values()) / 2**30 - 21.5) / 21.5 < 0.1


def test_a_model_too_large_for_the_devices_is_refused_before_any_data(tmp_path):
    c = default.get_config("smoke")
    c.model.update(d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128, d_mlp=8192)
    c.model.n_layers = 24  # about 1.6B parameters: 26 GB of weights and Adam state alone
    workdir = tmp_path / "w"
    with pytest.raises(preflight.PreflightError) as e:
        experiment.run(c, str(workdir))
    msg = str(e.value)
    assert "a training step needs about" in msg and "GiB per device" in msg
    assert "lower pretrain.microbatch_rows (or .microbatches), model.remat" in msg
    assert not (workdir / "data_cache").exists()  # refused before preparing data
