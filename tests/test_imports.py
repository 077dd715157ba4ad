"""Every module of the package imports from outside the repository (installed use, Colab)."""

import os
import pkgutil
import shutil
import subprocess
import sys

import retention_jax


def test_every_module_imports_outside_the_repository(tmp_path):
    names = sorted(m.name for m in pkgutil.walk_packages(retention_jax.__path__, "retention_jax."))
    assert "retention_jax.presets" in names and "retention_jax.hf" in names
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    # A copy of the package alone on the path, as an installed wheel lays it out.
    site = tmp_path / "site"
    shutil.copytree(retention_jax.__path__[0], site / "retention_jax")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code, *names],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    probe = subprocess.run(
        [sys.executable, "-c", "import configs"], cwd=tmp_path, env=env, capture_output=True
    )
    assert probe.returncode != 0  # configs/ really is out of reach
