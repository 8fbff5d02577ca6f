"""binder/ stays in step with pyproject.toml: Binder must build the environment the package
declares (plus ipywidgets 8, which Binder's base image lacks), and postBuild must install the
package and prefetch the paper models' weights without failing the build when offline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
# The extras Binder needs besides the runtime: JupyterLab for the notebooks, Voilà for the app.
BINDER_EXTRAS = ("lab",)
PAPER_MODELS = ("resnet50", "vgg11_bn", "densenet121")


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _binder_requirements() -> tuple[dict[str, Requirement], bool]:
    """(requirements by canonical name, whether the file installs the package itself)."""
    requirements: dict[str, Requirement] = {}
    installs_package = False
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line in (".", "-e .", "--editable .", "-e.", "./"):
            installs_package = True
            continue
        if line.startswith("-"):  # pip options such as --extra-index-url
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            pytest.fail(f"binder/requirements.txt: {raw!r} is not a requirement: {error}")
        name = canonicalize_name(requirement.name)
        assert name not in requirements, f"{requirement.name} is listed twice"
        requirements[name] = requirement
    return requirements, installs_package


def _declared() -> list[Requirement]:
    project = _pyproject()["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for extra in BINDER_EXTRAS:
        declared += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return declared


def test_runtime_and_lab_dependencies_are_in_binder_requirements():
    requirements, installs_package = _binder_requirements()
    runtime = {canonicalize_name(r.name) for r in
               (Requirement(d) for d in _pyproject()["project"]["dependencies"])}
    problems = []
    for declared in _declared():
        name = canonicalize_name(declared.name)
        listed = requirements.get(name)
        if listed is None:
            # Installing the package itself brings its runtime dependencies, not its extras.
            if not (installs_package and name in runtime):
                problems.append(f"{declared} is missing")
        elif listed.specifier != declared.specifier and name != "ipywidgets":
            problems.append(f"{listed} differs from pyproject's {declared}")
    assert not problems, "binder/requirements.txt out of step with pyproject.toml: " + \
        "; ".join(problems)


def test_ipywidgets_8_is_pinned():
    requirements, _ = _binder_requirements()
    ipywidgets = requirements.get("ipywidgets")
    assert ipywidgets is not None, "pin ipywidgets>=8 (Binder's base image ships 7)"
    assert not ipywidgets.specifier.contains("7.8.5"), ipywidgets
    declared = next(r for r in _declared() if canonicalize_name(r.name) == "ipywidgets")
    minimum = next(s.version for s in declared.specifier if s.operator == ">=")
    assert ipywidgets.specifier.contains(minimum), f"{ipywidgets} excludes pyproject's {declared}"


def test_torch_comes_from_the_cpu_wheel_index():
    text = (BINDER / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text


def test_post_build_installs_the_package_and_prefetches():
    post_build = BINDER / "postBuild"
    text = post_build.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    if os.name == "posix":
        assert os.access(post_build, os.X_OK), "git add --chmod=+x binder/postBuild"
    assert "set -euo pipefail" in text
    assert "pip install" in text and "-e ." in text
    assert "binder/prefetch_weights.py" in text


def test_prefetch_covers_the_paper_models():
    from pullback_widgets.models import MODELS

    text = (BINDER / "prefetch_weights.py").read_text()
    for name in PAPER_MODELS:
        assert name in MODELS
        assert f'"{name}"' in text


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prefetch_tolerates_being_offline(tmp_path):
    # Every download goes to a proxy port where nobody listens: offline, but failing at once.
    proxy = f"http://127.0.0.1:{_closed_port()}"
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), http_proxy=proxy,
               https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    result = subprocess.run([sys.executable, str(BINDER / "prefetch_weights.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "could not fetch resnet50, vgg11_bn, densenet121" in result.stderr
    assert "The build goes on" in result.stderr
