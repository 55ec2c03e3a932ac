"""The manifest and the commit protocol.

A checkpoint root is a Zarr v3 group. Its ``zarr.json`` is the **manifest**: the group's
attributes hold, under ``"zarrckpt"``, the list of committed steps and the directory of
each. A step is committed if and only if the manifest lists it; readers trust nothing else.

Saving step ``N``:

1. Write the step under a fresh directory ``step_<N:010d>.<random>``: one Zarr array per
   leaf, a group ``zarr.json`` per container, and last the step group's ``zarr.json`` whose
   attributes carry the tree record and the index of every leaf (shape, dtype, chunks,
   codec), so a reader needs one request to know the whole step.
2. Make it durable. On a local disk, one ``syncfs`` flushes every file and directory of the
   step (measured ~50 ms for 6,000 inodes, against ~1 s for ``fsync`` of each). Object
   stores have nothing to flush: a completed PUT is durable.
3. Publish: replace the manifest with one that lists the new step. Locally the new manifest
   is written to a temporary file, fsync'd, renamed over ``zarr.json`` and the directory is
   fsync'd; on object stores it is a single PUT, atomic by itself. No rename is needed
   anywhere else, because every step goes to a directory nobody has referenced yet.
4. Collect garbage: delete step directories the new manifest does not list (steps dropped
   by ``keep`` or replaced by ``overwrite``, and debris of crashed saves).

A crash before 3 leaves an unreferenced directory, invisible to readers and deleted by the
next successful save; a crash after 3 leaves only garbage. The committed steps are never
touched before the manifest that no longer lists them is published.

One writer per root at a time is assumed (the next save's garbage collection would delete
a concurrent writer's unpublished step).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ._store import Storage
from .errors import CorruptCheckpointError

__all__ = ["FORMAT_VERSION", "MANIFEST_KEY", "Manifest", "StepInfo"]

MANIFEST_KEY = "zarr.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)\.[0-9a-f]+$")


@dataclass(frozen=True)
class StepInfo:
    """One committed step: its number, directory, and totals."""

    step: int
    dir: str
    time: float
    leaves: int
    nbytes: int


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
                    "format": "zarrckpt",
                    "version": self.version,
                    "steps": [asdict(s) for s in self.steps],
                    **self.extra,
                }
            },
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise CorruptCheckpointError(
                f"{where}: the manifest is not valid JSON ({exc})"
            ) from exc
        meta = doc.get("attributes", {}).get("zarrckpt") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != "zarrckpt":
            raise CorruptCheckpointError(
                f"{where} is not a zarrckpt checkpoint (its zarr.json has no zarrckpt manifest)"
            )
        version = meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{where}: manifest format version {version!r} is newer than this zarrckpt "
                f"understands ({FORMAT_VERSION}); upgrade zarrckpt"
            )
        try:
            steps = tuple(StepInfo(**s) for s in meta["steps"])
        except (KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{where}: malformed manifest ({exc})") from exc
        extra = {k: v for k, v in meta.items() if k not in ("format", "version", "steps")}
        return cls(tuple(sorted(steps, key=lambda s: s.step)), version, extra)


def new_step_dir(step: int) -> str:
    return f"step_{step:010d}.{uuid.uuid4().hex[:12]}"


async def read_manifest(storage: Storage) -> Manifest | None:
    """The committed manifest, or None where no checkpoint was ever committed."""
    data = await storage.get(MANIFEST_KEY)
    if data is None:
        return None
    return Manifest.from_bytes(data, storage.describe(MANIFEST_KEY))


async def commit(storage: Storage, manifest: Manifest) -> None:
    """Publish ``manifest`` (step 3 of the protocol); the step data must already be durable."""
    await storage.put_atomic(MANIFEST_KEY, manifest.to_bytes())


async def collect_garbage(storage: Storage, manifest: Manifest) -> list[str]:
    """Delete step directories ``manifest`` does not list; returns their names."""
    live = {s.dir for s in manifest.steps}
    names = await storage.list_dir("")
    dead = [n for n in names if _STEP_DIR.match(n) and n not in live]
    dead += [n for n in names if n.startswith(MANIFEST_KEY + ".") and n.endswith(".partial")]
    for name in dead:
        await storage.delete_dir(name)
    return dead
