"""Every notebook in colabs/ runs top to bottom against a work directory, and reads well:
its headings render as headings and every figure cell shows its figure."""

import os
import pathlib
import re

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
    # The kernel inherits conftest's temp HOME dirs (MPLCONFIGDIR, IPYTHONDIR, JUPYTER_*);
    # figures go inline as PNG, as in Jupyter and Colab (conftest's Agg would hide them).
    env = {**os.environ, "RETENTION_JAX_WORKDIR": workdir}
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client.execute(env=env)
    return nb


def to_markdown(nb: nbformat.NotebookNode) -> str:
    """The notebook as one Markdown document: prose as is, code and text output fenced,
    images as image links (what a Markdown export of the executed notebook shows)."""
    parts = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            parts.append(cell.source)
            continue
        parts.append(f"```python\n{cell.source}\n```")
        for j, out in enumerate(cell.get("outputs", [])):
            data = out.get("data", {})
            if "image/png" in data:
                parts.append(f"![cell {i} output {j}](output_{i}_{j}.png)")
            elif "text" in out or "text/plain" in data:
                parts.append(f"```\n{out.get('text') or data['text/plain']}\n```")
    return "\n\n".join(parts) + "\n"


def headings(markdown: str) -> list[str]:
    """ATX headings outside fenced blocks."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} \S", line):
            out.append(line)
    return out


FIGURE_CALL = re.compile(r"\bdraw\w*\(")  # figures.draw_*, theory.draw: each returns a figure


def check_rendering(nb: nbformat.NotebookNode) -> None:
    markdown = to_markdown(nb)
    prose = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert not [s for s in prose if s.startswith("md")], "a cell starts with a literal 'md'"
    broken = [ln for s in prose for ln in s.splitlines() if re.match(r"[^#\s]\S*#{1,6} ", ln)]
    assert not broken, f"heading markers after other text: {broken}"
    marked = [ln for s in prose for ln in s.splitlines() if ln.startswith("#")]
    assert headings(markdown) == marked and marked[0].startswith("# ")
    figures = [c for c in nb.cells if c.cell_type == "code" and FIGURE_CALL.search(c.source)]
    assert figures
    for cell in figures:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        said = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        if not images and said.startswith("nothing to draw"):  # the rows lack those methods
            continue
        assert images, f"figure cell shows no image: {cell.source!r}"
        assert f"![cell {nb.cells.index(cell)} output" in markdown


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
    check_rendering(nb)
    assert nb.cells[2].source.startswith("import os") and "WORKDIR" in nb.cells[2].source
