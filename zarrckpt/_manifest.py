"""The two JSON documents that make a checkpoint: the root's manifest and each step's record.

Both are Zarr v3 group ``zarr.json`` documents whose attributes carry, under
``"zarrckpt"``, what zarrckpt needs; plain Zarr readers see ordinary groups.

- The **manifest** (``<root>/zarr.json``) lists the committed steps: number, directory,
  time, leaf count, bytes, and the crc32c of the step's record.
- The **step record** (``<root>/<step dir>/zarr.json``) holds the tree record: the
  containers, and for each leaf its path, kind, shape, dtype, chunks and codec, so that one
  read tells a reader the whole step.

A checkpoint may come from a stranger, so both parsers validate everything they return:
types, ranges, directory names, and the record's checksum; anything else is a
:class:`~zarrckpt.errors.CorruptCheckpointError`, never another exception.

Versions (the format is a promise): the manifest records ``version`` (major) and
``minor``. A reader refuses a newer *major* version, with a message saying to upgrade; a
newer minor version only adds optional fields, which older readers ignore. A change that
an older reader would misread bumps the major version. Step records carry the ``naming``
scheme version (how keys become Zarr names); readers never recompute names, they use the
names and paths recorded, so every naming scheme stays readable.

History: 1.0 (zarrckpt 0.1.0); 1.1 (zarrckpt 0.2.0) adds ``record_crc32c`` to step
entries, ``naming`` to step records and the ``from_target`` tree node (``_tree``: a leaf
that is not stored, taken from the target on load). 1.1 is one release: no reader of 1.1
lacks any of them (0.1.0 cannot open a root 0.2.0 wrote to at all).
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

import google_crc32c

from .errors import CorruptCheckpointError

__all__ = [
    "FORMAT_MINOR",
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "MANIFEST_MAX_BYTES",
    "METADATA_MAX_BYTES",
    "SPARE_PREFIX",
    "STEP_RECORD_MAX_BYTES",
    "TRASH_PREFIX",
    "Manifest",
    "StepInfo",
    "checksum",
    "new_step_dir",
    "parse_json",
    "parse_step_dir",
    "parse_step_record",
    "step_record_bytes",
]

MANIFEST_KEY = "zarr.json"
#: A local spare (a dropped step kept for recycling, ``_storage.local``) is named
#: ``SPARE_PREFIX + <its step directory name>``; readers never look at it.
SPARE_PREFIX = ".spare-"
#: A directory being deleted is first renamed out of the step namespace to
#: ``TRASH_PREFIX + <its name> + "." + <random>`` (``_storage.local``): the rename is the
#: claim that makes its deleter the only process that can ever reach its files.
TRASH_PREFIX = ".trash-"
FORMAT_VERSION = 1
FORMAT_MINOR = 1
_STEP_DIR = re.compile(r"^(\.tmp-)?step_(\d{10,20})\.([0-9a-f]{12})[0-9a-f]{8,32}$")


def new_step_dir(step: int) -> str:
    """A fresh directory name: ``step_<N:010d>.<ms since epoch, 12 hex><8 random hex>``."""
    return f"step_{step:010d}.{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def parse_step_dir(name: str) -> tuple[int, float, bool] | None:
    """``(step, creation time, is temporary)`` of a step directory name, or None."""
    match = _STEP_DIR.fullmatch(name)
    if match is None:
        return None
    return int(match.group(2)), int(match.group(3), 16) / 1000, bool(match.group(1))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40


def _shown(value: Any) -> str:
    """``value`` for a message: short, and shallow however deeply a document nests it."""
    return _REPR.repr(value)


# --- how much of a document is read ---------------------------------------------------------
# A checkpoint may come from a stranger, so nothing is read from it without a bound known
# before the read: the storage refuses a larger value from its size alone
# (``Storage.get(key, limit)``), so a 1 GiB sparse file in place of a document costs nothing.

#: The manifest: ~220 bytes per committed step, so 64 MiB lists ~300,000 steps (a save a
#: minute, every one kept, for seven months). Every open parses all of it: a manifest near
#: this size would cost a second per load, long before it is refused.
MANIFEST_MAX_BYTES = 64 * 1024 * 1024
#: A step record grows with the tree (~170 bytes per leaf with short names, more with long
#: keys, units or shardings; containers without leaves cost too), and nothing read before it
#: bounds the tree: the manifest's leaf count is a writer's word and counts no containers. So
#: a fixed ceiling: 256 MiB holds over a million leaves with long names, and is what one
#: load may spend on it (checked against the manifest's crc32c before it is parsed).
STEP_RECORD_MAX_BYTES = 256 * 1024 * 1024
#: An array's or group's own ``zarr.json``: what zarrckpt writes is under 1 KiB plus the
#: dimension names, whose worst case (64 axes named after a path 256 levels deep of 255-byte
#: names, JSON-escaped) is ~8.4 MB.
METADATA_MAX_BYTES = 16 * 1024 * 1024


def _parse_in_a_fresh_thread(data: bytes) -> Any:
    """``json.loads(data)`` on a thread of its own, whose stack is empty (see parse_json)."""
    box: dict[str, Any] = {}

    def parse() -> None:
        try:
            box["doc"] = json.loads(data)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=parse, name="zarrckpt-json", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box.pop("error")
    return box["doc"]


def parse_json(data: bytes, where: str, what: str) -> Any:
    """``data`` parsed, or :class:`CorruptCheckpointError` naming ``where`` and ``what`` it is.

    Python's JSON parser recurses once per nesting level, within the recursion limit of the
    calling thread: called deep in a stack (a framework's callbacks, a recursive caller), a
    record that zarrckpt wrote (at most ~2 levels per tree level, ``_tree.MAX_DEPTH``) could
    run out where it parses fine from the top. Such a parse is retried on a fresh thread;
    a document that nests too deeply even there is refused as such, not as invalid JSON.
    """
    problem = None
    try:
        return json.loads(data)
    except ValueError as exc:  # the message only: a traceback would keep the decoded text
        problem = f"{what} is not valid JSON ({exc})"
    except RecursionError:
        try:
            return _parse_in_a_fresh_thread(data)
        except ValueError as exc:
            problem = f"{what} is not valid JSON ({exc})"
        except RecursionError:
            problem = (
                f"{what} nests deeper than Python's JSON parser can follow (recursion limit "
                f"{sys.getrecursionlimit()}), far deeper than any document zarrckpt writes"
            )
    raise CorruptCheckpointError(f"{where}: {problem}")


def checksum(data: bytes) -> int:
    return google_crc32c.value(data)


def _int(value: Any, what: str, where: str, upper: int = 2**63) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < upper:
        raise CorruptCheckpointError(
            f"{where}: {what} must be an integer in [0, {upper}), got {_shown(value)}"
        )
    return value


def _finite(value: Any) -> TypeGuard[int | float]:
    """Whether ``value`` is a JSON number that a float holds (not bool, NaN, inf or 1e400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _zarr_group(doc: dict[str, Any], where: str, what: str) -> None:
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise CorruptCheckpointError(
            f"{where}: the {what} is not a Zarr v3 group (zarr_format "
            f"{_shown(doc.get('zarr_format'))}, node_type {_shown(doc.get('node_type'))})"
        )


def _zarrckpt_attributes(doc: Any) -> Any:
    """``attributes.zarrckpt`` of a Zarr group document, or None."""
    attributes = doc.get("attributes") if isinstance(doc, dict) else None
    return attributes.get("zarrckpt") if isinstance(attributes, dict) else None


def _version(value: Any, what: str, where: str, lowest: int = 1) -> int:
    """A version number (``what``: "manifest", "naming scheme", ...), at least ``lowest``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise CorruptCheckpointError(f"{where}: malformed {what} version {_shown(value)}")
    return value


def _major(value: Any, what: str, where: str) -> int:
    """A major format version, refusing a newer one with the remedy."""
    if _version(value, what, where) > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: {what} format version {str(value)[:40]} is newer than this zarrckpt "
            f"understands ({FORMAT_VERSION}); upgrade zarrckpt"
        )
    return value


@dataclass(frozen=True)
class StepInfo:
    """One committed step: its number, directory, totals and record checksum."""

    step: int
    dir: str
    time: float
    leaves: int
    nbytes: int
    record_crc32c: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> StepInfo:
        if not isinstance(doc, dict):
            raise CorruptCheckpointError(
                f"{where}: a step entry must be an object, got {_shown(doc)}"
            )
        step = _int(doc.get("step"), "step", where)
        name = doc.get("dir")
        parsed = parse_step_dir(name) if isinstance(name, str) else None
        if not isinstance(name, str) or parsed is None or parsed[2]:
            raise CorruptCheckpointError(f"{where}: {_shown(name)} is not a step directory name")
        if parsed[0] != step:
            raise CorruptCheckpointError(
                f"{where}: step {step} is stored in {name!r}, whose name says step {parsed[0]}"
            )
        when = doc.get("time")
        if not _finite(when):
            raise CorruptCheckpointError(f"{where}: step time must be a number, got {_shown(when)}")
        crc = doc.get("record_crc32c")
        return cls(
            step=step,
            dir=name,
            time=float(when),
            leaves=_int(doc.get("leaves"), "leaves", where),
            nbytes=_int(doc.get("nbytes"), "nbytes", where),
            record_crc32c=None if crc is None else _int(crc, "record_crc32c", where, 2**32),
        )


@dataclass(frozen=True)
class Manifest:
    steps: tuple[StepInfo, ...] = ()
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def step_numbers(self) -> list[int]:
        return [s.step for s in self.steps]

    @property
    def latest(self) -> StepInfo | None:
        return self.steps[-1] if self.steps else None

    @property
    def dirs(self) -> set[str]:
        return {s.dir for s in self.steps}

    def get(self, step: int) -> StepInfo | None:
        return next((s for s in self.steps if s.step == step), None)

    def with_step(self, info: StepInfo, keep: int | None) -> Manifest:
        """The manifest after committing ``info``: later steps dropped, newest ``keep`` kept."""
        steps = [s for s in self.steps if s.step < info.step] + [info]
        if keep is not None:
            steps = steps[-keep:]
        return Manifest(tuple(steps), self.version, self.extra)

    def to_bytes(self) -> bytes:
        doc = {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {
                "zarrckpt": {
                    **self.extra,
                    "format": "zarrckpt",
                    "version": FORMAT_VERSION,
                    "minor": FORMAT_MINOR,
                    "steps": [s.to_json() for s in self.steps],
                }
            },
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        doc = parse_json(data, where, "the manifest")
        meta = _zarrckpt_attributes(doc)
        if not isinstance(meta, dict) or meta.get("format") != "zarrckpt":
            raise CorruptCheckpointError(
                f"{where} is not a zarrckpt checkpoint (its zarr.json has no zarrckpt manifest)"
            )
        version = _major(meta.get("version"), "manifest", where)
        # A newer minor version only adds fields this reader may ignore; absent: 1.0.
        _version(meta.get("minor", 0), "manifest minor", where, lowest=0)
        _zarr_group(doc, where, "manifest")
        raw = meta.get("steps")
        if not isinstance(raw, list):
            raise CorruptCheckpointError(f"{where}: malformed manifest (steps must be a list)")
        steps = sorted((StepInfo.from_json(s, where) for s in raw), key=lambda s: s.step)
        if len({s.step for s in steps}) != len(steps) or len({s.dir for s in steps}) != len(steps):
            raise CorruptCheckpointError(f"{where}: malformed manifest (a step is listed twice)")
        extra = {k: v for k, v in meta.items() if k not in ("format", "version", "minor", "steps")}
        return cls(tuple(steps), version, extra)


def step_record_bytes(step: int, tree: dict[str, Any], naming: int) -> bytes:
    """The step group's ``zarr.json``: the tree record under ``attributes.zarrckpt``."""
    meta = {"version": FORMAT_VERSION, "step": step, "naming": naming, "tree": tree}
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"zarrckpt": meta}}
    # (a tree record is made by ``_tree.flatten``, never cyclic: no check, 20% faster)
    return json.dumps(doc, separators=(",", ":"), check_circular=False).encode()


def parse_step_record(data: bytes, info: StepInfo, where: str) -> dict[str, Any]:
    """The tree record of a step, after checking it against its manifest entry.

    Only the envelope is checked here (checksum, JSON, versions, step number); the tree
    record's containers and leaves are validated by the reader that walks them.
    """
    if info.record_crc32c is not None and checksum(data) != info.record_crc32c:
        raise CorruptCheckpointError(
            f"{where}: crc32c checksum mismatch (the step record is damaged or was replaced)"
        )
    doc = parse_json(data, where, "the step record")
    meta = _zarrckpt_attributes(doc)
    if isinstance(meta, dict):
        _major(meta.get("version", 1), "step record", where)
    if not isinstance(meta, dict) or "tree" not in meta:
        raise CorruptCheckpointError(
            f"{where}: no zarrckpt tree record (expected a Zarr group whose attributes hold "
            "zarrckpt.tree)"
        )
    _version(meta.get("naming", 1), "naming scheme", where)
    step = meta.get("step", info.step)
    if isinstance(step, bool) or not isinstance(step, int) or step != info.step:
        raise CorruptCheckpointError(
            f"{where}: the step record does not describe step {info.step} (it says {_shown(step)})"
        )
    _zarr_group(doc, where, "step record")
    tree = meta["tree"]
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(
            f"{where}: the tree record must be an object, got {type(tree).__name__}"
        )
    return tree
