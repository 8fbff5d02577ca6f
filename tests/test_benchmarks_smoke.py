"""CI smoke test: `python benchmarks/quality.py --quick` writes its four reports and its JSON."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

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
    assert names == {"quality.md", "quality.html", "temperature_curves.md",
                     "temperature_curves.html", "quality_raw.json"}

    text = (tmp_path / "quality.md").read_text(encoding="utf-8")
    header, rows = _table_rows(text, "| method |")
    assert header == ["method", "deletion (blur) ↓", "insertion (blur) ↑", "deletion (mean) ↓",
                      "insertion (mean) ↑", "deletion (blur, regions) ↓",
                      "insertion (blur, regions) ↑", "infidelity σ=0.01 ↓",
                      "infidelity σ=0.1 ↓", "ascent gain ↑", "randomised ρ ↓", "s / image ↓"]
    methods = [row[0] for row in rows]
    assert methods == run.table_methods and methods[-1] == "random"
    assert {"gradient", "gradient_x_input", "pullback sigmoid T=0.3",
            "pullback normal_cdf T=0.3", "pullback sigmoid T=0.3 (relative)"} <= set(methods)
    if importlib.util.find_spec("captum") is not None:
        assert {"guided_backprop", "integrated_gradients", "smoothgrad",
                "guided_gradcam"} <= set(methods)
        assert "guided_backprop_captum" not in methods  # equals the gradient on Lite0
    assert all(len(row) == len(header) for row in rows)
    assert all(re.match(r"-?\d", cell) for row in rows for cell in row[1:10])
    _, stages = _table_rows(text, "| randomised down to |")
    assert [row[0] for row in stages] == ["classifier", "conv_head+bn2"]
    assert "ResNet-50" in text and "nn.ReLU6" in text

    curves = (tmp_path / "temperature_curves.md").read_text(encoding="utf-8")
    header, rows = _table_rows(curves, "| method | mode | T |")
    assert [tuple(row[:3]) for row in rows] == [
        ("gradient", "—", "—"),
        ("pullback sigmoid", "absolute", "0.1"), ("pullback sigmoid", "absolute", "1"),
        ("pullback normal_cdf", "absolute", "0.1"), ("pullback normal_cdf", "absolute", "1"),
        ("pullback sigmoid", "relative", "0.3"), ("pullback sigmoid", "relative", "1")]
    assert "**Recommendation:" in curves

    for name in ("quality.html", "temperature_curves.html"):
        html = (tmp_path / name).read_text(encoding="utf-8")
        # Nothing is loaded from elsewhere: plotly.js is inline (its bundle merely mentions a
        # cdn.plot.ly address as the default source of geo maps, which these plots never use).
        assert "<script src=" not in html and "Plotly.newPlot" in html
        assert len(html) > 1_000_000

    raw = json.loads((tmp_path / "quality_raw.json").read_text(encoding="utf-8"))
    assert len(raw["results"]["gradient"]["ascent gain"]) == len(raw["photos"]) == 2
    rebuilt = tmp_path / "rebuilt"
    quality.main(["--from-json", str(tmp_path / "quality_raw.json"), "--out-dir", str(rebuilt)])
    assert (rebuilt / "quality.md").read_text(encoding="utf-8") == text
