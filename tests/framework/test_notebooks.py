"""Every notebook in colab/ runs top to bottom without an error, and the quickstart learns."""

import math
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []))
  assert "validation loss" in outputs
  if path.name != "quickstart.ipynb":
    return
  # The quickstart trains 30 steps of a 2-layer decoder: its loss falls, and its validation loss is
  # below ln 8192, what a uniform guess over the vocabulary scores.
  losses = [float(x) for x in re.search(r"train loss at steps 10, 20, 30: \[(.*?)\]", outputs).group(1).split(",")]
  assert losses[0] > losses[2], losses
  validation = float(re.search(r"validation loss ([0-9.]+)", outputs).group(1))
  assert validation < math.log(8192), validation
  assert outputs.count("'It is a truth universally acknowledged") == 1 and outputs.count("'Emma") == 1
