"""CI smoke test: `python benchmarks/quality.py --quick` writes its tables through the command."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pullback_widgets import evaluation as ev
from tests.reference import window_loop_pool_grad

QUALITY = Path(__file__).parents[1] / "benchmarks" / "quality.py"


def _load_benchmark(monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_benchmark", QUALITY)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file executes.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _table_rows(markdown: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows) of the first Markdown table whose header starts so."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_quality_benchmark_writes_its_tables(tmp_path, monkeypatch):
    quality = _load_benchmark(monkeypatch)
    # One thread: on a shared CI machine, two would spin waiting for each other's core.
    run = quality.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"quality.csv", "quality.summary.md", "quality.settings.json",
                     "temperature_curves.csv", "temperature_curves.settings.json",
                     "temperature_curves.summary.md", "temperature_curves.md",
                     "temperature_curves.html", "quality_run.json"}

    # The quality table is the command's output: 2 photos x top-2 x 3 methods x 2 metrics.
    rows = ev.read_rows(tmp_path / "quality.csv")
    assert len(rows) == 2 * 2 * 3 * 2
    assert {r[0] for r in rows} == {"photos/chelsea.png", "photos/coffee.png"}
    summary = (tmp_path / "quality.summary.md").read_text(encoding="utf-8")
    header, body = _table_rows(summary, "| metric |")
    assert header == ["metric", "method", "n", "mean ± s.e.", "Δ vs gradient [95% CI]",
                      "Δ vs random [95% CI]"]
    assert [row[:2] for row in body] == [[f"{m} {a}", method] for m, a in
                                         (("deletion", "↓"), ("insertion", "↑"))
                                         for method in ("gradient", "pullback", "random")]
    assert "pullback-widgets evaluate photos --targets top-2" in run.note

    curves = (tmp_path / "temperature_curves.md").read_text(encoding="utf-8")
    header, rows = _table_rows(curves, "| method | mode | T |")
    assert [tuple(row[:3]) for row in rows] == [
        ("gradient", "—", "—"), ("random", "—", "—"),
        ("pullback sigmoid", "absolute", "0.1"), ("pullback sigmoid", "absolute", "0.7"),
        ("pullback normal_cdf", "absolute", "0.1"), ("pullback normal_cdf", "absolute", "0.7"),
        ("pullback sigmoid", "relative", "0.3"), ("pullback sigmoid", "relative", "1")]
    assert all(re.match(r"-?\d", cell) for row in rows for cell in row[3:])
    assert "**Recommendation:" in curves
    html = (tmp_path / "temperature_curves.html").read_text(encoding="utf-8")
    # Nothing is loaded from elsewhere: plotly.js is inline (its bundle merely mentions a
    # cdn.plot.ly address as the default source of geo maps, which these plots never use).
    assert "<script src=" not in html and "Plotly.newPlot" in html

    rebuilt = quality.main(["--quick", "--report-only", "--out-dir", str(tmp_path)])
    assert (tmp_path / "temperature_curves.md").read_text(encoding="utf-8") == curves
    assert rebuilt.photos == run.photos


SPEED = Path(__file__).parents[1] / "benchmarks" / "speed.py"


def test_speed_benchmark_prints_r1_and_the_memory_ratio(tmp_path, monkeypatch):
    # One repeat of ResNet-50 (random weights) at batch 1; its memory figures come from two
    # fresh processes. The numbers are not checked, only that each row carries them.
    spec = importlib.util.spec_from_file_location("speed_benchmark", SPEED)
    speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, speed)
    spec.loader.exec_module(speed)
    out = tmp_path / "speed.md"
    text = speed.main(["--models", "resnet50", "--batches", "1", "--repeats", "1",
                       "--profile", "--decompose", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == text
    header, rows = _table_rows(text, "| device |")
    assert header[5].startswith("r1 = pullback ÷ gradient")
    assert [row[:3] for row in rows] == [["cpu", "resnet50", "1"]]
    ratio = r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)"
    assert re.fullmatch(ratio, rows[0][5]) and re.fullmatch(ratio, rows[0][6])
    assert re.fullmatch(r"\d+\.\d\d / \d+\.\d\d", rows[0][7])
    assert header[8].startswith("minor page faults") and re.fullmatch(r"\d+ / \d+", rows[0][8])
    assert header[9:] == ["gradient under a pass-through mode ÷ gradient",
                          "gate='hard' pullback ÷ gradient",
                          "one sigmoid pass over the gated pre-activations ÷ gradient"]
    assert all(re.fullmatch(ratio, cell) for cell in rows[0][9:12])
    assert "resnet50: random weights" in text
    profile = text.split("Profile, resnet50, batch 1:", 1)[1]
    assert re.search(r"\| all ops \| \d+\.\d\d \| \d+\.\d\d \| [+-]\d+\.\d\d \|", profile)
    assert "SoftClampBackward" in profile or "softplus_backward" in profile


def test_speed_benchmark_keeps_the_heap_in_its_own_process():
    # --keep-heap changes glibc's malloc for good, so it runs in a child process. ResNet-50 at
    # batch 8 is where a pullback faults 58-97 thousand pages in per call with glibc's defaults
    # (benchmarks/results/speed.md); with the heap kept, at most the heap's last growth remains
    # (one 24.5 MiB step is 6,272 pages).
    result = subprocess.run(
        [sys.executable, str(SPEED), "--models", "resnet50", "--batches", "8",
         "--repeats", "1", "--no-memory", "--keep-heap"],
        capture_output=True, text=True, check=True, timeout=600)
    _, rows = _table_rows(result.stdout, "| device |")
    assert rows[0][:3] == ["cpu", "resnet50", "8"]
    assert "timed with --keep-heap" in result.stdout
    gradient_faults, pullback_faults = (int(n) for n in rows[0][8].split(" / "))
    assert gradient_faults < 20_000 and pullback_faults < 20_000


BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


def _import_benchmark(path: Path, monkeypatch):
    """Import a benchmark script as its own module, without running its main()."""
    monkeypatch.syspath_prepend(str(path.parent))  # the scripts import each other by name
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.name)
def test_every_benchmark_script_imports(path, monkeypatch):
    # A rename in one script once broke another's import (vit.py took speed.py's helpers by
    # their old names) while only the scripts run in CI stayed green. Helper modules (the
    # zoo's model list and reference) have no main() of their own.
    module = _import_benchmark(path, monkeypatch)
    if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"):
        assert callable(module.main)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vit_benchmark_writes_its_cost_and_similarity_tables(tmp_path, monkeypatch):
    vit = _import_benchmark(BENCHMARKS[[p.name for p in BENCHMARKS].index("vit.py")],
                            monkeypatch)
    out = tmp_path / "vit.md"
    text = vit.main(["--repeats", "1", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == text
    _, costs = _table_rows(text, "| gradient (ms) |")
    assert len(costs) == 1 and all(re.fullmatch(r"\d+(\.\d\d)?", cell) for cell in costs[0])
    _, similarity = _table_rows(text, "| attention rule |")
    assert [row[:2] for row in similarity] == [
        [rule, t] for rule in ("detached", "differentiated")
        for t in ("model defaults", "0.3", "3")]
    assert all(-1 <= float(cell) <= 1 for row in similarity for cell in row[2:])


@pytest.mark.parametrize("detached", [False, True])
def test_pool_forms_closed_form_is_the_engines_soft_pool_gradient(monkeypatch, detached):
    # pool_forms.py times a sum-pooling closed form against the engine's soft pool: a timing
    # that compares two different gradients would mean nothing. In float64, at a temperature
    # where one shift per map is safe, both give the window loop's gradient.
    forms = _import_benchmark(BENCHMARKS[[p.name for p in BENCHMARKS].index("pool_forms.py")],
                              monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    grad_out = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    expected = window_loop_pool_grad(x, grad_out, 3, 2, 1, 0.7, detached=detached)
    actual = forms.closed_form_pool_backward(grad_out, x, 0.7, detached, torch.float64)
    torch.testing.assert_close(actual, expected)
