"""Register zarrckpt's data types with zarr-python when zarr is imported, not before.

The documented promise is that after ``import zarrckpt`` plain zarr-python reads bfloat16 &
co. Registering needs zarr and ml_dtypes, about 1.5 s of imports that ``zarrckpt ls`` has no
use for (issue 17), so :func:`install` registers at once only where zarr is already imported;
otherwise it puts a one-shot finder at the front of ``sys.meta_path``. Asked for ``zarr``, the
finder finds zarr's real spec with the other finders and wraps its loader: zarr's module runs
as it always does, then ``_zarr_dtypes`` is imported, which registers, and the finder takes
itself out. Not before: ``importlib.util.find_spec("zarr")`` (xarray asks it to know whether
zarr is installed) finds zarr without importing it. (zarr 3.4 would take ``zarr.data_type``
entry points instead; zarr 3.1, the release Python 3.11 resolves, ignores them.)

Safety: the import system calls ``find_spec`` holding its global import lock, so the finder
needs no lock of its own; ``sys.meta_path`` is rebound, never changed in place, as another
thread's import may be iterating it. A failing look-up returns None, and the import goes on as if the
finder were not there. A failing registration is raised from ``import zarr``, as it used to be
from ``import zarrckpt``, and again at the next try: a zarr that cannot be given these types
should not pass silently.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["install"]

#: the module whose import registers the data types
_REGISTER = "zarrckpt._zarr_dtypes"


class _RegisteringLoader(importlib.abc.Loader):
    """zarr's own loader, followed by the registration."""

    def __init__(self, loader: importlib.abc.Loader, finder: _ZarrFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # zarr sees its own loader (importlib.resources and the like ask for it), not this one
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        importlib.import_module(_REGISTER)
        # Rebound, never changed in place: another thread's import may be iterating the list.
        sys.meta_path = [f for f in sys.meta_path if f is not self._finder]

    def __getattr__(self, name: str) -> Any:  # is_package, get_code, get_resource_reader ...
        return getattr(self._loader, name)


class _ZarrFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands zarr's spec, with a registering loader, to the import."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "zarr":
            return None
        try:
            spec = self._real_spec(fullname, path, target)
        except Exception:  # the import's own search meets it again and reports it
            return None
        if spec is None or spec.loader is None:  # zarr not installed: maybe later
            return None
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def _real_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        """What the finders after this one find for ``fullname``."""
        for finder in [f for f in sys.meta_path if f is not self]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                return spec
        return None


def install() -> None:
    """Register now if zarr is imported; else when it is. Calling it again does nothing."""
    if "zarr" in sys.modules:
        importlib.import_module(_REGISTER)
    elif not any(isinstance(f, _ZarrFinder) for f in sys.meta_path):
        sys.meta_path = [_ZarrFinder(), *sys.meta_path]
