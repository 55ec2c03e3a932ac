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

History: 1.0 (zarrckpt 0.1.0); 1.1 adds ``record_crc32c`` to step entries and ``naming`` to
step records.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import google_crc32c

from .errors import CorruptCheckpointError

__all__ = [
    "FORMAT_MINOR",
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "Manifest",
    "StepInfo",
    "checksum",
    "new_step_dir",
    "parse_step_dir",
    "parse_step_record",
    "step_record_bytes",
]

MANIFEST_KEY = "zarr.json"
FORMAT_VERSION = 1
FORMAT_MINOR = 1
_STEP_DIR = re.compile(r"^(\.tmp-)?step_(\d{10,20})\.([0-9a-f]{12})[0-9a-f]{8,32}$")


def new_step_dir(step: int) -> str:
    """A fresh directory name: ``step_<N:010d>.<ms since epoch, 12 hex><8 random hex>``."""
    return f"step_{step:010d}.{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def parse_step_dir(name: str) -> tuple[int, float, bool] | None:
    """``(step, creation time, is temporary)`` of a step directory name, or None."""
    match = _STEP_DIR.match(name)
    if match is None:
        return None
    return int(match.group(2)), int(match.group(3), 16) / 1000, bool(match.group(1))


def checksum(data: bytes) -> int:
    return google_crc32c.value(data)


def _int(value: Any, what: str, where: str, upper: int = 2**63) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < upper:
        raise CorruptCheckpointError(
            f"{where}: {what} must be an integer in [0, {upper}), got {value!r}"
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
                f"{where}: a step entry must be an object, got {doc!r:.80}"
            )
        name = doc.get("dir")
        parsed = parse_step_dir(name) if isinstance(name, str) else None
        if parsed is None or parsed[2]:
            raise CorruptCheckpointError(f"{where}: {name!r:.80} is not a step directory name")
        when = doc.get("time")
        if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
            raise CorruptCheckpointError(f"{where}: step time must be a number, got {when!r:.80}")
        crc = doc.get("record_crc32c")
        return cls(
            step=_int(doc.get("step"), "step", where),
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
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(
                f"{where}: the manifest is not valid JSON ({exc})"
            ) from exc
        attributes = doc.get("attributes") if isinstance(doc, dict) else None
        meta = attributes.get("zarrckpt") if isinstance(attributes, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != "zarrckpt":
            raise CorruptCheckpointError(
                f"{where} is not a zarrckpt checkpoint (its zarr.json has no zarrckpt manifest)"
            )
        version = meta.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CorruptCheckpointError(f"{where}: malformed manifest version {version!r:.80}")
        if version > FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{where}: manifest format version {version} is newer than this zarrckpt "
                f"understands ({FORMAT_VERSION}); upgrade zarrckpt"
            )
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
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_step_record(data: bytes, info: StepInfo, where: str) -> dict[str, Any]:
    """The tree record of a step, after checking it against its manifest entry."""
    if info.record_crc32c is not None and checksum(data) != info.record_crc32c:
        raise CorruptCheckpointError(
            f"{where}: crc32c checksum mismatch (the step record is damaged or was replaced)"
        )
    try:
        meta = json.loads(data)["attributes"]["zarrckpt"]
        tree = meta["tree"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: no zarrckpt tree record ({exc})") from exc
    if not isinstance(tree, dict) or meta.get("step", info.step) != info.step:
        raise CorruptCheckpointError(f"{where}: the step record does not describe step {info.step}")
    version = meta.get("version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: step record version {version} is newer than this zarrckpt understands "
            f"({FORMAT_VERSION}); upgrade zarrckpt"
        )
    return tree
