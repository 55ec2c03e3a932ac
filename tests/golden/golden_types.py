"""Classes that golden checkpoints name by import path (``golden_types:Point``).

A namedtuple is recorded as ``"<module>:<qualname>"`` and rebuilt by importing that path,
so these names are part of the golden data: never rename, move or change the fields of
anything here. ``tests/golden`` must be on ``sys.path`` (``make_golden.py`` and
``tests/test_golden.py`` put it there) so that the module is importable as ``golden_types``.
"""

from collections import namedtuple
from typing import Any, NamedTuple

#: A plain ``collections.namedtuple``.
Point = namedtuple("Point", ["x", "y"])


class Outer:
    class Inner(NamedTuple):
        """A ``typing.NamedTuple`` nested in a class (recorded as ``golden_types:Outer.Inner``)."""

        a: Any
        b: Any
