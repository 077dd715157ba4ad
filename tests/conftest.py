"""Test setup: 8 fake CPU devices, strict rank promotion, no writes into $HOME, and one
persistent compilation cache for the session."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With libtpu installed (the `tpu` extra: deviceless TPU compiles), every JAX process would
# first try to open a TPU: 0.5 s and a page of warnings each. Tests run on the CPU; the
# TPU compiles load libtpu themselves (retention_jax.topology).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_HOME = tempfile.mkdtemp(prefix="retention_jax_home_")
for _var in ("MPLCONFIGDIR", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR"):
    os.environ.setdefault(_var, os.path.join(_HOME, _var.lower()))
os.environ.setdefault("MPLBACKEND", "Agg")
# The suite compiles the same tiny-model programs in dozens of processes (every real
# `main.py` run compiles its train step, init and evaluation: about 5 s on 2 cores); a
# cache in this session's home serves the repeats, subprocesses included.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_HOME, "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    path = os.path.abspath(os.path.join(SHARED_DATA, "smollm2-tokenizer"))
    if not os.path.isdir(path):
        pytest.skip(f"SmolLM2 tokenizer files not found at {path}")
    return path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A finished `configs/default.py:smoke` experiment and the runtime that ran it."""
    from configs import default
    from retention_jax import experiment, runtime

    workdir = str(tmp_path_factory.mktemp("smoke"))
    c = default.get_config("smoke")
    rt = runtime.Runtime.create(c.mesh, c.rules)
    experiment.run(c, workdir, rt=rt)
    return workdir, rt


@pytest.fixture(scope="session")
def smoke_workdir(smoke_run) -> str:
    """The smoke experiment's work directory (shared by the tests that read one)."""
    return smoke_run[0]
