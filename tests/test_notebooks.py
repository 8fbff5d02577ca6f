"""The tutorial notebooks in notebooks/: each runs top to bottom on a fresh kernel, offline, and
is committed without outputs. (Each takes well under a minute on an idle 2-core machine; that is
not checked here, where a stopwatch would fail on a loaded shared runner.)

Every notebook is executed by nbclient on the "python3" kernel, which jupyter_client starts with
this very interpreter (the kernel spec's argv[0] "python" is replaced by sys.executable), so the
kernel sees this venv and its editable pullback_widgets; test_kernel_is_this_environment guards
that. A few notebooks get extra check cells appended, run on the same kernel after the last
cell, to verify what the prose claims and what the widgets computed in the background.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest

try:
    import ipykernel  # noqa: F401  (the kernel the notebooks run on)
    import nbclient
    import nbformat
except ImportError as error:  # fail loudly: CI must run these, never skip them
    raise ImportError(f"the notebook tests need nbclient, nbformat and ipykernel ({error}); "
                      "pip install -e '.[dev,lab]'") from error

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_quickstart.ipynb",
    "02_what_is_a_pullback.ipynb",
    "03_feature_visualisation.ipynb",
    "04_inside_the_network.ipynb",
    "05_classroom.ipynb",
    "06_paper_models.ipynb",
    "07_ground_truth.ipynb",
)
# Each takes 10-25 s on an idle 2-core machine; the limit on each cell (and on the kernel's
# start) leaves room for a busy CI runner and still stops a hung cell.
NOTEBOOK_TIMEOUT_S = 180
MAX_NOTEBOOK_BYTES = 64_000

# Appended to the notebook of the same name and run after its last cell.
CHECKS = {
    "01_quickstart.ipynb": """
assert explorer.wait(120), "the explorer is still computing"
assert "⚠" not in explorer.status.value, explorer.status.value
assert explorer.top_buttons[0].description.startswith("espresso")
""",
    "03_feature_visualisation.ipynb": """
assert ascent.wait(120)
assert "⚠" not in ascent.status.value, ascent.status.value
assert len(ascent.result.images) == 4  # the start and three steps
assert grid.gains.shape == (3, 3)
assert explorer.wait(120)
assert "⚠" not in explorer.status.value, explorer.status.value
compared = explorer.gradient_figure.layout.title.text
from pullback_widgets.evaluation.methods import captum_available
assert compared.startswith("Integrated gradients (16 steps" if captum_available()
                           else "Plain gradient"), compared
""",
    "04_inside_the_network.ipynb": """
assert unit_ascent.wait(120)
assert "⚠" not in unit_ascent.status.value, unit_ascent.status.value
assert unit_ascent.result.images[-1].shape[0] == 2  # pullback and gradient, side by side
assert unit_ascent.curve_figure.layout.yaxis.title.text == "unit activation (spatial mean)"
assert len(visualisation_gains) == 12
assert vgg_explorer.wait(120)
assert "⚠" not in vgg_explorer.status.value, vgg_explorer.status.value
assert "features.10 channel 7" in vgg_explorer.status.value
assert vgg_explorer.labels == pw.imagenet_labels()
""",
    "05_classroom.ipynb": """
assert len(exercises) == 6
for ex in exercises:
    ex.choices.value = next(option for option in ex.choices.options if option != ex.correct)
    assert "✗" in ex.feedback.value, ex.feedback.value
    ex.choices.value = ex.correct
    assert "✓" in ex.feedback.value, ex.feedback.value
    ex.run_button.click()  # on_click handlers run synchronously
    assert ex.evidence.children, "the experiment showed nothing"
    shown = " ".join(str(getattr(child, "value", "")) for child in ex.evidence.children)
    assert "⚠" not in shown and "running" not in shown, shown
assert "6 / 6" in score.value, score.value
# The experiments must back the answers the exercises call correct.
rows = re.findall(r"<td[^>]*>([^<]*)</td>", exercises[0].evidence.children[0].value)
assert float(rows[-1]) > 0.99, rows  # T = 1e-4: pullback ~ gradient
rows = re.findall(r"<td[^>]*>([^<]*)</td>", exercises[1].evidence.children[0].value)
assert float(rows[-1]) > 0.999, rows  # T = 1e4: the same map for both photos
assert "True" in exercises[2].evidence.children[0].value
labels = [a.text for a in exercises[3].evidence.children[0].layout.annotations]
early, late = (float(re.search(r"([\\d.]+)%", label).group(1)) for label in labels[:2])
assert late > 5 * early, labels
first_row = re.findall(r"<td[^>]*>([^<]*)</td>", exercises[4].evidence.children[1].value)[0]
assert first_row == "tiger cat", first_row
shares = dict(re.findall(r"<td[^>]*>([^<]*)</td><td[^>]*>([^<]*)</td>",
                         exercises[5].evidence.children[1].value))
assert max(shares, key=lambda name: float(shares[name])) == exercises[5].correct, shares
""",
    "06_paper_models.ipynb": """
assert models, "no model to run the notebook on"
""",
    "07_ground_truth.ipynb": """
assert explorer.wait(120), "the explorer is still computing"
assert "⚠" not in explorer.status.value, explorer.status.value
explorer.show_evidence.value = True
assert explorer.wait(120)
assert any(trace.type == "contour" for trace in explorer.pullback_figure.data)
assert result.n == 64 and result.accuracy > 0.9
assert "random" in result.beats("gradient") or "gradient" in result.beats("random")
assert len(rows) == 3 and all(len(row) == 6 for row in rows)
assert classes.images.shape == (1, 4, 3, 64, 64)
""",
}
CHECK_PRELUDE = "import re\n"


@pytest.fixture
def offline_port():
    """A local port that refuses connections: the proxy that makes downloads fail at once.

    Bound, never listening, for the whole test: a port closed again at once could be taken
    meanwhile by another process of a shared machine (a server of another test run), which
    would then answer the notebook's downloads."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def kernel_env(tmp_path, monkeypatch, offline_port):
    """Environment the kernel inherits: no user IPython profile, connection files and the torch
    hub cache in tmp_path, one torch thread, and every HTTP(S) download refused, so that
    notebook 06 takes its offline path at once whether or not this machine has internet."""
    proxy = f"http://127.0.0.1:{offline_port}"
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    if "OMP_NUM_THREADS" not in os.environ:
        # Two torch threads on two cores stall each other whenever another process holds one
        # core (a shared runner, or the rest of the suite): a 10 s notebook then took 140 s.
        # One thread costs a few seconds on an idle machine and stays steady on a busy one.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _execute(nb, workdir: Path) -> None:
    """Run ``nb`` in place on a fresh "python3" kernel."""
    # nbclient's own start limit is 60 s, which a kernel importing torch on a loaded machine
    # can pass; a hung start still fails.
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=NOTEBOOK_TIMEOUT_S,
        startup_timeout=NOTEBOOK_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(workdir)}})
    client.execute()


def _text_outputs(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "".join(parts)


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


# --------------------------------------------------------------------------- committed state


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    path = NOTEBOOK_DIR / name
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, "outputs or a widget state crept in"
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    # nbclient and Jupyter save the widgets' state here; it is as heavy as outputs.
    assert "widgets" not in nb.metadata
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {index} has an execution count"
        assert "attachments" not in cell, f"cell {index} has attachments"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_has_a_title_and_prose(name):
    nb = _read(name)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    markdown = sum(cell.cell_type == "markdown" for cell in nb.cells)
    assert markdown >= 3, "a tutorial needs prose between its cells"


# --------------------------------------------------------------------------- execution


def test_kernel_is_this_environment(kernel_env):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import sys, pullback_widgets\n"
                                          "print(sys.prefix)\nprint(pullback_widgets.__file__)")]
    _execute(nb, kernel_env)
    prefix, package = _text_outputs(nb.cells[0]).split()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()
    import pullback_widgets

    assert Path(package).resolve() == Path(pullback_widgets.__file__).resolve()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_top_to_bottom(name, kernel_env):
    nb = _read(name)
    if name in CHECKS:
        nb.cells.append(nbformat.v4.new_code_cell(CHECK_PRELUDE + CHECKS[name]))
    _execute(nb, kernel_env)
    texts = [_text_outputs(cell) for cell in nb.cells if cell.cell_type == "code"]
    assert not any("Traceback" in text for text in texts)

    if name == "02_what_is_a_pullback.ipynb":
        _check_pullback_limits("".join(texts))
    if name == "06_paper_models.ipynb":
        # Offline (as the fixture makes it): said once, clearly, and the fallback ran.
        offline = [text for text in texts if "Offline" in text]
        assert len(offline) == 1, offline
        assert "Falling back to the embedded efficientnet_lite0" in offline[0]
        assert "Models in this notebook: efficientnet_lite0" in offline[0]


def _check_pullback_limits(text: str) -> None:
    """Notebook 02's prose says T -> 0 gives the gradient and T -> inf an input-independent map;
    its printed numbers must keep saying so."""
    cold = re.search(r"T = 0\.0001 +cosine\(pullback, gradient\) = ([\d.]+)", text)
    assert cold and float(cold.group(1)) > 0.99, text
    warm = re.search(r"T = 0\.7 +cosine\(coffee, cat\) = (-?[\d.]+)", text)
    hot = re.search(r"T = 10000 +cosine\(coffee, cat\) = ([\d.]+)", text)
    assert warm and abs(float(warm.group(1))) < 0.3, text
    assert hot and float(hot.group(1)) > 0.999, text
    assert "forward unchanged inside the context: True" in text
    assert "pw.excitation_pullback agrees: True" in text
    by_hand = re.search(r"max \|by hand - inside soft_gating\| / max \|pullback\| = (\S+)", text)
    assert by_hand and float(by_hand.group(1)) < 1e-4, text
