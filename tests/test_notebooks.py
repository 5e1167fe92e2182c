"""Every notebook in notebooks/ runs top to bottom (nbclient, a fresh kernel each).

A notebook is teaching material that imports tinylm; when a change to tinylm
breaks one, this test fails and names the notebook and the cell. The notebooks
`assert` the claims their text makes (a difference is 0, rows sum to 1, cached
equals uncached, a gradient check passes), so a claim that stops holding fails
here too, not only a cell that raises. Figures use ipykernel's inline backend,
which needs no display.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # generous: CI machines are shared; each notebook aims at < 2 minutes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed:\n{exc}")
