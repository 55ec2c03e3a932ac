"""``import zarrckpt`` and ``zarrckpt ls`` stay light (issue 17), and zarr-python still reads
bfloat16 & co. after ``import zarrckpt``, whichever of the two is imported first.

What a command imports is checked in a fresh interpreter (this one has imported everything);
how long it takes is measured by hand, never asserted.
"""

import glob
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import zarrckpt
from zarrckpt import _repr, cli

#: what ``import zarrckpt`` and ``zarrckpt ls`` must not import (fsspec: a local root needs none;
#: importlib.metadata: only ``__version__`` and ``--version`` read the installed version)
HEAVY = ("zarr", "ml_dtypes", "numpy", "jax", "fsspec", "numcodecs", "importlib.metadata")
#: what ``tree`` and ``info`` must not import (they read leaves' values with NumPy; ``epoch_i``
#: is stored uncompressed, being at most 64 bytes, so no numcodecs)
NOT_FOR_TREE = ("zarr", "ml_dtypes", "jax", "fsspec", "numcodecs", "importlib.metadata")


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def _imported(stderr: str) -> set[str]:
    """The top-level packages ``-X importtime`` reports (``import time: 12 | 34 |   numpy.lib``)."""
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }
    return {name.split(".")[0] for name in names} | names


@pytest.fixture
def root(tmp_path):
    """Step 7 of float arrays and a Python int (which ``tree`` and ``info`` show by value)."""
    path = str(tmp_path / "run")
    state = {"a": np.ones(3), "b": {"c": np.zeros((4, 5), np.float32)}, "epoch_i": 3}
    zarrckpt.save_pytree(path, state, step=7, verbose=False)
    return path


def test_import_zarrckpt_is_light():
    code = f"import sys, zarrckpt; print([m for m in {HEAVY!r} if m in sys.modules])"
    assert _python("-c", code).stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["ls", "tree", "info"])
def test_reading_commands_import_little(root, command):
    done = _python("-X", "importtime", "-m", "zarrckpt", command, root, "--json")
    doc = json.loads(done.stdout)
    assert (doc["steps"][0] if command == "ls" else doc)["step"] == 7
    imported = _imported(done.stderr)
    assert "zarrckpt.cli" in imported  # the report was read
    assert not imported & set(HEAVY if command == "ls" else NOT_FOR_TREE)


@pytest.mark.parametrize("first", ["zarrckpt", "zarr"])
def test_zarr_python_reads_bfloat16_after_import_zarrckpt(tmp_path, first):
    path = str(tmp_path / "run")
    zarrckpt.save_pytree(path, {"bf": np.arange(6.0).astype(ml_dtypes.bfloat16)}, verbose=False)
    (step,) = glob.glob(os.path.join(path, "step_*"))
    second = "zarr" if first == "zarrckpt" else "zarrckpt"
    code = (
        f"import {first}; import {second}; import sys\n"
        "a = zarr.open_array(sys.argv[1], mode='r')\n"
        "print(a.dtype, a[:].astype('float32').tolist(), type(zarr.__loader__).__name__)"
    )
    out = _python("-c", code, os.path.join(step, "bf")).stdout.split(" ", 1)
    assert out[0] == "bfloat16"
    values, loader = out[1].rsplit(" ", 1)
    assert json.loads(values) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert loader != "_RegisteringLoader"  # zarr keeps its own loader


def test_the_hook_is_installed_once_and_removed_by_the_import():
    """Once, however often zarrckpt installs it; out once zarr is imported, not found."""
    code = (
        "import sys, zarrckpt\n"
        "from zarrckpt import _zarr_hook\n"
        "_zarr_hook.install()\n"
        "count = lambda: sum(type(f).__name__ == '_ZarrFinder' for f in sys.meta_path)\n"
        "before = count()\n"
        "import importlib.util; importlib.util.find_spec('zarr')  # xarray asks; nothing imported\n"
        "import zarr\n"
        "print(before, count(), zarr.dtype.data_type_registry.get('bfloat16').__name__)"
    )
    assert _python("-c", code).stdout.split() == ["1", "0", "ZarrCkpt_bfloat16"]


def test_a_failing_registration_fails_import_zarr_every_time():
    code = (
        "import zarrckpt\n"
        "from zarrckpt import _zarr_hook\n"
        "_zarr_hook._REGISTER = 'zarrckpt._no_such_module'\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        import zarr\n"
        "    except ModuleNotFoundError as exc:\n"
        "        print(exc.name)\n"
    )
    assert _python("-c", code).stdout.split() == ["zarrckpt._no_such_module"] * 2


def test_public_names_resolve_lazily():
    from zarrckpt import ZarrCkptError, save_pytree
    from zarrckpt.api import save_pytree as defined

    assert save_pytree is defined
    assert issubclass(ZarrCkptError, Exception)
    for name in zarrckpt.__all__:
        assert getattr(zarrckpt, name) is not None
    assert set(zarrckpt.__all__) <= set(dir(zarrckpt))
    assert zarrckpt.checkpoint.step_url  # the submodule a guide uses
    with pytest.raises(AttributeError, match="module 'zarrckpt' has no attribute 'nope'"):
        zarrckpt.nope  # noqa: B018


def test_the_cli_sizes_read_as_the_reprs_do():
    for n in (0, 1, 1023, 1024, 1536, 10**6, 2**30 - 1, 2**30, 5 * 2**40, 3 * 2**50):
        assert cli._human(n) == _repr.human(n)
