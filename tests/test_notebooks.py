"""Notebooks are executed so they cannot rot, are committed with their outputs (what a reader
sees without running them), and what they show is checked in a real browser.

``python tests/test_notebooks.py`` re-executes them and saves their outputs.
"""

import os
import re
import tempfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from test_repr import chromium_or_skip, probe

import zarrckpt
from zarrckpt import _repr

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPLORE = ROOT / "notebooks" / "explore_checkpoint.ipynb"


#: Appended to the notebook a test runs (never to the one committed): copies the checkpoint it
#: wrote to ``memory://`` into its working directory, for the test to read what it shows.
KEEP_CHECKPOINT = 'import fsspec; fsspec.filesystem("memory").get(root, {dest!r}, recursive=True)'


def execute(path, workdir, keep_checkpoint=False):
    """``path`` executed top to bottom in a fresh kernel that imports this checkout's
    zarrckpt (not whichever is installed), in ``workdir``, with temporary files there too;
    ``keep_checkpoint``: then copy its in-memory checkpoint to ``workdir / "snn-run"``."""
    nb = nbformat.read(path, as_version=4)
    if keep_checkpoint:
        dest = str(workdir / "snn-run")
        nb.cells.append(nbformat.v4.new_code_cell(KEEP_CHECKPOINT.format(dest=dest)))
    pythonpath = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "TMPDIR": str(workdir), "PYTHONPATH": os.pathsep.join(pythonpath)}
    NotebookClient(
        nb, timeout=300, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    ).execute(env=env)  # fmt: skip
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """path -> (executed notebook, its working directory); each notebook runs once."""
    done = {}

    def get(path):
        if path not in done:
            workdir = tmp_path_factory.mktemp(path.stem)
            done[path] = execute(path, workdir, keep_checkpoint=path == EXPLORE), workdir
        return done[path]

    return get


def _outputs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def _html(nb):
    return [o["data"]["text/html"] for o in _outputs(nb) if o.get("data", {}).get("text/html")]


def _machine_specific(nb):
    """What a reader of the notebook should not see: warnings (a red stderr box: issue 19's
    TqdmWarning, as BrainPy imports tqdm.auto and the kernel lacked ipywidgets) and paths
    of the machine that ran it (temporary directories, site-packages)."""
    found = []
    for out in _outputs(nb):
        if out.output_type == "stream" and out.name == "stderr":
            found.append(f"stderr: {out.text[:300]}")
        texts = [out.get("text", "")] + [
            v
            for k, v in out.get("data", {}).items()
            if k.startswith("text/") and isinstance(v, str)
        ]
        for text in texts:
            found += [
                f"{word!r} in {text[max(0, text.find(word) - 80) : text.find(word) + 80]!r}"
                for word in ("TqdmWarning", "site-packages", "/tmp/", tempfile.gettempdir() + "/")
                if word in text
            ]
    return list(dict.fromkeys(found))


def test_there_is_a_notebook():
    assert EXPLORE in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, executed):
    nb, _ = executed(path)
    assert not [o for o in _outputs(nb) if o.output_type == "error"]
    if path == EXPLORE:
        html = _html(nb)
        assert any("zarrckpt.Checkpoint" in h and "l1" in h for h in html)  # the tree
        assert any("zarrckpt.LazyArray" in h for h in html)
        assert any(o.get("data", {}).get("image/png") for o in _outputs(nb))  # the plots
        streams = "".join(o.get("text", "") for o in _outputs(nb) if o.output_type == "stream")
        assert re.search(r"8 blocks; input weight norm per neuron: \d+\.\d+ ± \d+\.\d+", streams)
    assert not _machine_specific(nb), _machine_specific(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_its_outputs(path):
    """A notebook is read on GitHub and in JupyterLab before anyone runs it: it must be
    committed executed, in one run from top to bottom, without errors."""
    nb = nbformat.read(path, as_version=4)
    hint = f"re-execute and save {path.name}: python tests/test_notebooks.py"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), hint
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert not errors, f"{hint} ({errors[0].get('ename')}: {errors[0].get('evalue')})"
    assert not _machine_specific(nb), f"{hint}: {_machine_specific(nb)}"
    if path == EXPLORE:
        assert any(o.get("data", {}).get("image/png") for o in _outputs(nb)), hint
        html = _html(nb)
        tree = [h for h in html if "zarrckpt.Checkpoint" in h]
        assert tree and any("zarrckpt.LazyArray" in h for h in html), hint
        # made by the current repr: a repr that changed must be shown as it now is
        assert _repr._style() in tree[0], f"the committed HTML repr is out of date; {hint}"


#: JupyterLab's own values of --jp-layout-color0 and --jp-content-font-color0 per theme, as
#: nbconvert's "lab" template defines them.
THEMES = {"light": ("rgb(255, 255, 255)", "rgb(0, 0, 0)"), "dark": ("rgb(17, 17, 17)", "rgb(255, 255, 255)")}  # fmt: skip


@pytest.mark.parametrize("theme", THEMES)
def test_browser_shows_the_notebook_as_the_checkpoint_is(executed, tmp_path, theme):
    """The executed notebook, converted as nbconvert shares it (JupyterLab's CSS in either
    theme), as headless Chromium shows it, against the checkpoint the notebook wrote."""
    from nbconvert import HTMLExporter

    browser = chromium_or_skip()
    nb, workdir = executed(EXPLORE)
    ckpt = zarrckpt.open_checkpoint(str(workdir / "snn-run"))
    page, _ = HTMLExporter(template_name="lab", theme=theme).from_notebook_node(nb)
    page = re.sub(r'<script src="https?://[^"]*"></script>', "", page)  # offline: no CDN
    shown = probe(browser, tmp_path, page)

    assert shown["images"] >= 1  # the plots, decoded
    background, color = THEMES[theme]
    assert (shown["background"], shown["color"]) == (background, color)
    tree, leaf = shown["reprs"][:2]  # ckpt, then W
    collapsed = tree["collapsed"]
    assert f"step {ckpt.step}" in collapsed and f"{len(ckpt.leaves())} leaves" in collapsed
    for info in ckpt.leaves():
        name = info.path.rsplit("/", 1)[-1]
        cells = [_repr._dims(info.shape), str(info.dtype), _repr.human(info.nbytes),
                 _repr._dims(info.chunks), info.codec]  # fmt: skip
        assert re.search(rf"^{name}\s+" + r"\s+".join(map(re.escape, cells)), collapsed, re.M)
    for step in ckpt._opened.manifest.steps:
        assert re.search(
            rf"^{step.step}\s+{_repr._utc(step.time)}\s+{step.leaves}\s", collapsed, re.M
        )

    expanded = tree["expanded"]
    W = ckpt["l1/W"]
    rows = W.chunks[0] * (_repr.SAMPLE_LEAF_BYTES // (W.chunks[0] * W.shape[1] * 4))
    sample = np.asarray(W[:rows], dtype=np.float64)
    assert (
        f"sample: first {sample.size:,} of {W.size:,} elements [:{rows}, :], "
        f"{rows // W.chunks[0]} of {W.shape[0] // W.chunks[0]} chunks"
    ) in expanded
    assert re.search(r"\s+".join(["min", "max", "mean", "std", "NaN"] + [
        _repr._g(v) for v in (sample.min(), sample.max(), sample.mean(), sample.std())
    ] + ["0"]), expanded)  # fmt: skip
    V = np.asarray(ckpt["l2/V"], dtype=np.float64)
    assert f"all {V.size:,} elements" in expanded and _repr._g(V.mean()) in expanded
    assert repr(np.asarray(W)) in leaf["collapsed"]  # LazyArray: NumPy's repr, from 4 corners


def main():
    for path in NOTEBOOKS:
        with tempfile.TemporaryDirectory() as tmp:
            nb = execute(path, Path(tmp))
        nbformat.write(nb, path)
        print(f"executed and saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
