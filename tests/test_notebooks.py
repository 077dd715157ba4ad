"""Every notebook in colabs/ runs top to bottom against a work directory."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from retention_jax.analysis import synthetic

COLABS = pathlib.Path(__file__).parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def synthetic_workdir(tmp_path_factory) -> str:
    wd = str(tmp_path_factory.mktemp("workdir"))
    synthetic.write(wd, synthetic.rows(pipelines=("music->chem",)))
    return wd


def run_notebook(path: pathlib.Path, workdir: str, cwd: str) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": cwd}}
    )
    # The kernel inherits conftest's temp HOME dirs (MPLCONFIGDIR, IPYTHONDIR, JUPYTER_*).
    client.execute(env={**os.environ, "RETENTION_JAX_WORKDIR": workdir})
    return nb


def test_notebooks_found():
    assert {p.stem for p in NOTEBOOKS} == {"frontiers", "lambda_sweep", "theory"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("workdir", ["synthetic", pytest.param("smoke", marks=pytest.mark.slow)])
def test_notebook_runs(path, workdir, request, tmp_path):
    wd = request.getfixturevalue(f"{workdir}_workdir")
    nb = run_notebook(path, wd, str(tmp_path))
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert nb.cells[2].source.startswith("import os") and "WORKDIR" in nb.cells[2].source
