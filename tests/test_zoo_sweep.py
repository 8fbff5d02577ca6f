"""CI for the model-zoo sweep (benchmarks/zoo.py): its quick models pass every check, and the
sweep has teeth (a pullback 0.1 % off in one kind of gate, or a hook left behind, is a FAIL)."""

import importlib
from pathlib import Path

import pytest
import torch

from pullback_widgets import gates

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def zoo(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("zoo")


@pytest.fixture
def one_thread():
    # On a shared CI machine, two threads would spin waiting for each other's core.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_sweep_has_no_failure(zoo, tmp_path, one_thread):
    out = tmp_path / "zoo.md"
    rows = zoo.main(["--quick", "--out", str(out)])
    assert [row.name for row in rows] == list(zoo.QUICK)
    assert not [(row.name, row.failures, row.message) for row in rows if row.status == "FAIL"]
    assert all(row.status == "ok" for row in rows), [(r.name, r.message) for r in rows]
    # Each compared with the float64 reference, not only run.
    assert all(row.reference and not row.reference.startswith("n/a") for row in rows)
    text = out.read_text(encoding="utf-8")
    assert f"{len(rows)} models: **{len(rows)} ok**" in text
    assert text.count("\n| torchvision/") + text.count("\n| timm/") == len(rows)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_slightly_wrong_pool_temperature_fails_the_row(zoo, monkeypatch, one_thread):
    real = gates.GateSettings.temperature_of
    monkeypatch.setattr(gates.GateSettings, "temperature_of", lambda self, kind: real(
        self, kind) * (1.001 if kind == "pool" else 1.0))
    (spec,) = zoo.find(["torchvision/resnet18"])
    row = zoo.check(spec)
    assert row.status == "FAIL"
    assert any("float64 reference" in failure for failure in row.failures)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_hook_left_on_the_model_fails_the_row(zoo, monkeypatch, one_thread):
    import pullback_widgets as pw

    real_init = pw.PullbackSession.__init__

    def leaky_init(self, model, inputs, **settings):
        real_init(self, model, inputs, **settings)
        model.register_forward_pre_hook(lambda module, args: None)

    monkeypatch.setattr(pw.PullbackSession, "__init__", leaky_init)
    (spec,) = zoo.find(["torchvision/squeezenet1_1"])
    row = zoo.check(spec)
    assert row.status == "FAIL"
    assert any("left changed" in failure and "hooks" in failure for failure in row.failures)
