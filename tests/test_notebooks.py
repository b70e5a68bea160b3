"""Every notebook under ``examples/notebooks`` runs from top to bottom without an error and
draws at least one figure.

The notebooks run in a Jupyter kernel of this very interpreter: the test writes a private
kernelspec whose ``argv`` is ``sys.executable -m ipykernel_launcher`` and looks kernels up only
there, so it needs no kernelspec installed anywhere (and a global ``python3`` kernelspec that
points at another Python cannot be picked up by mistake). The kernel's working directory is
``examples/notebooks``, where Jupyter opens them. A cell that runs past ``CELL_TIMEOUT_S`` is
interrupted (a notebook's ``finally`` then shuts its Ray workers down) and fails the test.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "examples" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "hap-test-python"
CELL_TIMEOUT_S = 300
NOTEBOOK_TIMEOUT_S = 480
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """Kernelspecs from a private directory holding one kernel: this interpreter's ipykernel."""
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / KERNEL_NAME).mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (kernels / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def execute(notebook: nbformat.NotebookNode, kernel_specs: KernelSpecManager) -> None:
    """Run every cell in place, in ``NOTEBOOK_DIR``; raises on the first failing cell."""
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        interrupt_on_timeout=True,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in notebook.cells for out in cell.get("outputs", [])]


@pytest.mark.timeout(120)
def test_the_kernel_is_this_interpreter_in_the_notebook_directory(kernel_specs):
    notebook = new_notebook(
        cells=[new_code_cell("import os, sys\nprint(sys.executable)\nos.getcwd()")]
    )
    execute(notebook, kernel_specs)
    (printed, value) = outputs(notebook)
    assert printed["text"].strip() == sys.executable
    assert value["data"]["text/plain"].strip("'\"") == str(NOTEBOOK_DIR)


def test_the_example_notebooks_are_there():
    names = {path.name for path in NOTEBOOKS}
    assert {"plan_large_models.ipynb", "train_small_gpt.ipynb"} <= names


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_without_errors_and_draws(path: Path, kernel_specs):
    notebook = nbformat.read(path, as_version=4)
    execute(notebook, kernel_specs)
    errors = [out for out in outputs(notebook) if out["output_type"] == "error"]
    assert not errors, "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors)
    images = [
        base64.b64decode(out["data"]["image/png"])
        for out in outputs(notebook)
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} drew no figure (no image/png output)"
    assert all(image.startswith(PNG_MAGIC) for image in images)
