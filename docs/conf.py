"""Sphinx configuration of zarrckpt's documentation (``sphinx-build -W docs build/docs``).

Sphinx with the pydata theme, as zarr-python and xarray publish theirs: our readers come from
those sites and find the same layout, and Sphinx's autodoc reads the API reference from the
docstrings themselves (MkDocs would need mkdocstrings for that). Pages are Markdown (MyST).
"""

from __future__ import annotations

import re
from pathlib import Path

import zarrckpt

project = "zarrckpt"
author = "the zarrckpt developers"
copyright = "the zarrckpt developers; Apache-2.0"
release = zarrckpt.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the docstrings' "Args:" / "Returns:" sections
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = ["_build"]
root_doc = "index"

# MyST: anchors for headings down to ###, so pages link to sections of format.md
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# autodoc / autosummary: one page per name of zarrckpt.__all__ (docs/generated/, not committed),
# from the templates in _templates/autosummary/
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "pydata_sphinx_theme"
html_title = f"zarrckpt {release}"
html_theme_options = {
    "github_url": "https://github.com/zarrckpt/zarrckpt",
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 5,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = False

_API_PAGE = Path(__file__).parent / "api.rst"


def _check_api_page(app: object) -> None:
    """Warn (an error under ``-W``) if api.rst leaves out a name of ``zarrckpt.__all__``."""
    from sphinx.util import logging

    listed = set(re.findall(r"^\s+(\w+)\s*$", _API_PAGE.read_text(), flags=re.MULTILINE))
    missing = sorted(set(zarrckpt.__all__) - {"__version__"} - listed)
    if missing:
        logging.getLogger(__name__).warning(
            "docs/api.rst does not list %s of zarrckpt.__all__", ", ".join(missing)
        )


def _no_inline_type(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """Runs before napoleon: a property's first line is prose, never napoleon's inline
    ``type: description`` (``Checkpoint.url`` reads "Where ... lies (...): what ...")."""
    if what in ("attribute", "property") and lines:
        lines[:0] = ["..", ""]  # an empty comment takes the place napoleon parses


def _skip_builtin_members(
    app: object, what: str, name: str, obj: object, skip: bool, options: object
) -> bool | None:
    """Leave out what a class inherits from a built-in (a namedtuple's ``count``, ``index``)."""
    owner = getattr(obj, "__qualname__", "").partition(".")[0]
    return True if owner in ("tuple", "object", "dict", "list") else None


def setup(app: object) -> None:
    app.connect("builder-inited", _check_api_page)  # type: ignore[attr-defined]
    app.connect("autodoc-process-docstring", _no_inline_type, priority=400)  # type: ignore[attr-defined]
    app.connect("autodoc-skip-member", _skip_builtin_members)  # type: ignore[attr-defined]
