"""The version is written once, in pyproject.toml; the package and the CLI report what was
installed from it."""

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import zarrckpt
from zarrckpt import cli

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_metadata():
    installed = importlib.metadata.version("zarrckpt")
    assert zarrckpt.__version__ == installed
    written = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert installed == written, (
        f"zarrckpt {installed} is installed from a pyproject.toml that now says {written}: "
        "reinstall it (pip install -e '.[test]')"
    )


def test_cli_prints_the_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"zarrckpt {zarrckpt.__version__}\n"


def test_a_source_tree_that_was_never_installed_still_imports():
    code = (
        "import importlib.metadata as m\n"
        "installed = m.version\n"
        "def version(name):\n"
        "    if name == 'zarrckpt':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return installed(name)\n"
        "m.version = version\n"
        "import zarrckpt\n"
        "print(zarrckpt.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0+unknown\n"
