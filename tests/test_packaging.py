"""The release artefacts, built offline with the setuptools backend from this environment (what
``python -m build --no-isolation`` does): the sdist carries every source file its own test
suite reads, and the wheel built from it carries the classroom notebook, the licence and
pyproject's version, so that ``pullback-widgets app`` works from any folder.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# Left out of the sdist on purpose (MANIFEST.in): megabytes of HTML the benchmarks rewrite,
# and git's own file.
LEFT_OUT = ("benchmarks/results/*.html", ".gitignore")
CLASSROOM = "pullback_widgets/notebooks/05_classroom.ipynb"
BUILD_TIMEOUT_S = 300


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _source_files() -> list[str]:
    """The source tree's files: what git tracks, or, in an unpacked sdist, the file list
    setuptools wrote into it."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.splitlines()
    else:
        listed = (ROOT / "pullback_widgets.egg-info" / "SOURCES.txt").read_text().splitlines()
    return sorted(f for f in listed if (ROOT / f).is_file())


def _backend(hook: str, out: Path, cwd: Path) -> Path:
    """Run the PEP 517 ``hook`` of setuptools in ``cwd``; the path of what it built."""
    code = f"import sys\nfrom setuptools import build_meta\nprint(build_meta.{hook}(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=cwd, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist built from a clean copy of the source files, unpacked, and a wheel built from
    that unpacked sdist, as pip would."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    for name in _source_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)  # keep links as links
    sdist = _backend("build_sdist", work / "dist", source)
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    unpacked = work / "unpacked" / sdist.name.removesuffix(".tar.gz")
    wheel = _backend("build_wheel", work / "dist", unpacked)
    return {"work": work, "sdist": sdist, "unpacked": unpacked, "wheel": wheel}


def test_sdist_holds_every_source_file(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {member.name.split("/", 1)[1] for member in archive.getmembers()
                 if member.isfile() and "/" in member.name}
    expected = [f for f in _source_files()
                if not any(fnmatch.fnmatch(f, pattern) for pattern in LEFT_OUT)]
    missing = sorted(set(expected) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if any(fnmatch.fnmatch(n, p) for p in LEFT_OUT)]
    for needed in ("LICENSE", "tests/reference.py", "tests/browser/harness.py",
                   "notebooks/05_classroom.ipynb", CLASSROOM, "binder/requirements.txt",
                   "benchmarks/results/temperature_study.md", "scripts/test.sh"):
        assert needed in names, needed
    # The link becomes a file in the sdist, with the same content: still one notebook.
    unpacked = built["unpacked"]
    assert (unpacked / "notebooks" / "05_classroom.ipynb").read_bytes() == \
        (unpacked / CLASSROOM).read_bytes()


def test_sdist_test_suite_collects(built):
    unpacked = built["unpacked"]
    # One interpreter collects the suite and then says where it found the package.
    code = ("import sys, pytest\n"
            "status = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests'])\n"
            "import pullback_widgets\nprint('package:', pullback_widgets.__file__)\n"
            "sys.exit(status)")
    env = dict(os.environ, PYTHONPATH=str(unpacked))  # never the checkout these tests run from
    done = subprocess.run([sys.executable, "-c", code], cwd=unpacked, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "error" not in lines[-2].lower(), done.stdout[-2000:]
    collected = [line for line in lines if "::" in line]
    assert len(collected) > 100, done.stdout[-2000:]
    modules = {line.split("::")[0] for line in collected}
    assert {"tests/test_packaging.py", "tests/test_app.py", "tests/browser/test_voila.py"} <= \
        modules
    assert Path(lines[-1].removeprefix("package: ")).is_relative_to(unpacked)


def test_wheel_ships_the_classroom_notebook_licence_and_version(built):
    project = _project()
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
        assert wheel.read(CLASSROOM) == (ROOT / CLASSROOM).read_bytes()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        assert wheel.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert f"\nVersion: {project['version']}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert "\nLicense-File: LICENSE\n" in metadata
    repository = project["urls"]["Repository"]
    assert f"\nProject-URL: Repository, {repository}\n" in metadata
    assert not [n for n in names if n.startswith(("tests/", "notebooks/", "benchmarks/"))]


def test_installed_wheel_serves_the_classroom_from_any_folder(built):
    site, elsewhere = built["work"] / "site", built["work"] / "elsewhere"
    elsewhere.mkdir()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(site), str(built["wheel"])], capture_output=True, text=True,
        timeout=BUILD_TIMEOUT_S)
    assert install.returncode == 0, install.stderr
    # Dependencies come from this environment; the package only from the installed wheel.
    code = ("import pullback_widgets as pw\nfrom pullback_widgets import app\n"
            "print(pw.__file__)\nprint(app._check_notebook(None))\nprint(pw.__version__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere,
                          env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    package_file, notebook, version = done.stdout.strip().splitlines()[-3:]
    assert Path(package_file).is_relative_to(site)
    assert Path(notebook) == site / CLASSROOM
    assert version == _project()["version"]


def test_version_is_pyprojects():
    from importlib.metadata import version

    import pullback_widgets as pw

    assert pw.__version__ == version("pullback-widgets") == _project()["version"]
