"""What a new user reads and runs: README's Python examples run as written (at 64 px), every
``pw.NAME`` it mentions exists, its command-line synopses name only real options, and the
command line's help states the defaults its parser uses."""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pullback_widgets as pw
from pullback_widgets import app, cli
from pullback_widgets.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def _block(containing: str) -> str:
    (block,) = [b for b in PYTHON_BLOCKS if containing in b]
    return block


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_pw_name_in_the_readme_exists():
    missing = []
    for first, second in set(re.findall(r"\bpw\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", README)):
        if not hasattr(pw, first):
            missing.append(first)
        elif second and first in ("evaluation", "synthetic") and \
                not hasattr(getattr(pw, first), second):
            missing.append(f"{first}.{second}")
    assert not missing, missing


def test_the_readmes_python_examples_run_as_written(tmp_path, monkeypatch):
    # The API tour, then the Quantus example in the same namespace (it uses model and x), at
    # 64 px so that the test is quick; the one photo of the user's is a file made here.
    monkeypatch.setattr(pw, "load_image", functools.partial(pw.load_image, size=64))
    monkeypatch.setattr(pw, "sample_image", functools.partial(pw.sample_image, size=64))
    photo = tmp_path / "my_photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), np.uint8)).save(photo)
    tour = _block("pw.load_image(")
    assert '"my_photo.jpg"' in tour
    namespace: dict = {}
    exec(compile(tour.replace('"my_photo.jpg"', repr(str(photo))), "README-api-tour", "exec"),
         namespace)
    assert namespace["g"].shape == namespace["x"].shape == (1, 3, 64, 64)
    assert namespace["grid"].images.shape == (2, 2, 3, 64, 64)  # rows images, columns targets
    quantus_example = _block("import quantus")
    assert "nr_runs=100" in quantus_example
    exec(compile(quantus_example.replace("nr_runs=100", "nr_runs=2"), "README-quantus", "exec"),
         namespace)
    assert np.isfinite(namespace["scores"]).all()


def test_the_readmes_command_synopses_name_only_real_options():
    options = {name: {s for a in sub._actions for s in a.option_strings}
               for name, sub in _subparsers().items()}
    unknown = []
    for block in BASH_BLOCKS:
        for command in re.split(r"\n(?=pullback-widgets )", block):
            if not command.startswith("pullback-widgets "):
                continue
            name = command.split()[1]
            unknown += [f"{name} {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*",
                                                               command)
                        if flag not in options[name]]
    assert not unknown, unknown


def test_every_default_the_help_states_is_the_parsers():
    wrong = []
    for name, sub in _subparsers().items():
        for action in sub._actions:
            for stated in re.findall(r"\(default:? (\d+(?:\.\d+)?)\b", action.help or ""):
                if action.default is None or float(stated) != float(action.default):
                    wrong.append(f"{name} {action.option_strings}: help {stated}, "
                                 f"default {action.default!r}")
    assert not wrong, wrong


def test_the_help_states_the_defaults_it_used_to_leave_out():
    commands = _subparsers()
    helps = {(name, s): a for name, sub in commands.items() for a in sub._actions
             for s in a.option_strings}
    port = helps["app", "--port"]
    assert port.default == app.DEFAULT_PORT and f"default {app.DEFAULT_PORT}" in port.help
    methods = helps["evaluate", "--methods"]
    assert f"(default {' '.join(methods.default)})" in " ".join(methods.help.split())
    for command in ("explain", "grid", "evaluate"):
        assert "default sigmoid" in helps[command, "--gate"].help


def test_image_size_help_names_each_models_own_size():
    # "default: the model's, 224" was wrong for shapes (64), the default model of --synthetic.
    (action,) = [a for a in _subparsers()["evaluate"]._actions
                 if "--image-size" in a.option_strings]
    assert action.default is None  # the model's own, looked up in run_command
    for name, spec in MODELS.items():
        assert str(spec.input_size) in action.help, name
    assert f"shapes {MODELS['shapes'].input_size}" in action.help


def test_python_dash_m_pullback_widgets_is_the_command():
    # "No module named pullback_widgets.__main__".
    done = subprocess.run([sys.executable, "-m", "pullback_widgets", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: pullback-widgets" in done.stdout


def _doc_commands(text: str) -> list[str]:
    """Every command a doc shows, in a bash block or an inline code span, on one line."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    spans = re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for block in blocks:
        commands += block.replace("\\\n", " ").splitlines()
    return commands + [" ".join(span.split()) for span in spans]


def _options_in_source(path: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z-]*)\"", path.read_text()))


def _unknown_options(text: str) -> list[str]:
    """The options a doc's commands pass that their parsers do not define: the command line
    (also after torchrun), the benchmark scripts and ``python -m pullback_widgets.synthetic``."""
    commands = _subparsers()
    unknown = []
    for command in _doc_commands(text):
        command = command.split(" #")[0]
        if (found := re.search(r"\bpullback-widgets (\w+)(.*)", command)) and \
                found[1] in commands:
            known = {s for a in commands[found[1]]._actions for s in a.option_strings}
            rest, name = found[2], f"pullback-widgets {found[1]}"
        elif found := re.search(r"\b(\w+)\.py\b(.*)", command):
            script = ROOT / "benchmarks" / f"{found[1]}.py"
            if not script.exists():
                continue
            known, rest, name = _options_in_source(script) | {"--help"}, found[2], script.name
        elif found := re.search(r"pullback_widgets\.synthetic train(.*)", command):
            known = _options_in_source(ROOT / "pullback_widgets" / "synthetic" / "__init__.py")
            rest, name = found[1], "synthetic train"
        else:
            continue
        unknown += [f"{name} {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest)
                    if flag not in known]
    return unknown


def test_every_command_in_the_docs_names_only_real_options():
    # The README's synopses are checked above; this covers docs/, inline code spans and the
    # benchmark scripts too (`speed.py --keep-heap`, `zoo.py --threads 1`).
    assert "--batch-size" in " ".join(_doc_commands(DOCS["scale_out.md"]))
    wrong = {name: _unknown_options(text) for name, text in {"README.md": README, **DOCS}.items()}
    assert not any(wrong.values()), wrong


def test_the_ambiguous_class_name_scale_out_gives_is_ambiguous():
    # It named ImageNet's two "crane"s, which torchvision's labels tell apart ("crane" and
    # "crane bird"): --labels-from-folders took a folder "crane" as class 517 without a word.
    (name,) = re.findall(r'an ambiguous name such as ImageNet\'s\s+(?:two\s+)?"(\w+)"',
                         DOCS["scale_out.md"])
    with pytest.raises(pw.PullbackWidgetsError, match="ambiguous"):
        pw.labels.find_class(name, pw.imagenet_labels())
