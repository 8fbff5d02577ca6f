"""Static promises about the package source: no pickle loads, nothing fetched from a CDN."""

import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "pullback_widgets"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_torch_load_is_weights_only():
    calls = [(path.name, match) for path in SOURCES
             for match in re.findall(r"torch\.load\(([^)]*)\)", path.read_text())]
    assert calls, "expected the model loaders to call torch.load"
    for name, arguments in calls:
        assert "weights_only=True" in arguments, f"{name}: torch.load({arguments})"


def test_no_pickle_or_eval_of_user_data():
    for path in SOURCES:
        text = path.read_text()
        unsafe = r"\bpickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\("
        assert not re.search(unsafe, text), path.name


def test_reports_do_not_load_plotly_from_a_cdn():
    for path in SOURCES:
        text = path.read_text()
        assert "include_plotlyjs=\"cdn\"" not in text and "cdn.plot.ly" not in text, path.name
