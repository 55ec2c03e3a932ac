"""The manifest and the commit protocol.

A checkpoint root is a Zarr v3 group. Its ``zarr.json`` is the **manifest**: the group's
attributes hold, under ``"zarrckpt"``, the list of committed steps and the directory of
each. A step is committed if and only if the manifest lists it; readers trust nothing else.

Saving step ``N``:

1. Write the step under a fresh directory ``step_<N:010d>.<ms:012x><random>`` (the creation
   time in milliseconds, hex, then random bits): one Zarr array per
   leaf, a group ``zarr.json`` per container, and last the step group's ``zarr.json`` whose
   attributes carry the tree record and the index of every leaf (shape, dtype, chunks,
   codec), so a reader needs one request to know the whole step.
2. Make it durable. On a local disk, one ``syncfs`` flushes every file and directory of the
   step (measured ~50 ms for 6,000 inodes, against ~1 s for ``fsync`` of each). Object
   stores have nothing to flush: a completed PUT is durable.
3. Publish: replace the manifest with one that lists the new step, *if it is still the
   manifest this save started from*. Locally the new manifest is written to a temporary
   file, fsync'd, renamed over ``zarr.json`` and the directory is fsync'd, all under an
   exclusive ``flock`` that also guards the comparison; on S3 it is one PUT with
   ``If-Match: <etag>`` (``If-None-Match: *`` for a new root), atomic by itself. If another
   writer committed in between, this save deletes its directory and raises
   :class:`ConcurrentWriteError`: two writers can both fail or one can win, but a commit is
   never lost silently. No rename is needed on object stores, because every step goes to a
   directory nobody has referenced yet.
4. Collect garbage: delete step directories the previous manifest listed and the new one
   does not (steps dropped by ``keep`` or replaced by ``overwrite``), and unreferenced
   directories that are debris of crashed saves. Debris is told apart from another writer's
   unfinished step by the writer's lease: locally a ``flock`` held on a file in the
   directory while it is written (the kernel releases it when the writer dies, so debris is
   collected by the very next save); on S3, which has no locks, by age (older than an hour,
   see ``S3Storage``).

A crash before 3 leaves an unreferenced directory, invisible to readers; a crash after 3
leaves only garbage. Committed steps are never touched before a manifest that no longer
lists them is published.

Backends without conditional writes (``memory://``, GCS through gcsfs, any other zarr
store) assume one writer per root at a time: the manifest is replaced unconditionally and
every unreferenced directory is debris.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ._store import Storage
from .errors import CorruptCheckpointError

__all__ = ["FORMAT_VERSION", "MANIFEST_KEY", "Manifest", "StepInfo"]

MANIFEST_KEY = "zarr.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^(?:\.tmp-)?step_(\d+)\.([0-9a-f]{12})[0-9a-f]+$")


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
    return f"step_{step:010d}.{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


async def read_manifest(storage: Storage) -> Manifest | None:
    """The committed manifest, or None where no checkpoint was ever committed."""
    manifest, _ = await read_manifest_versioned(storage)
    return manifest


async def read_manifest_versioned(storage: Storage) -> tuple[Manifest | None, Any]:
    """The manifest and the version token a later :func:`commit` compares against."""
    data, token = await storage.get_with_token(MANIFEST_KEY)
    if data is None:
        return None, None
    return Manifest.from_bytes(data, storage.describe(MANIFEST_KEY)), token


async def commit(storage: Storage, manifest: Manifest, token: Any) -> bool:
    """Publish ``manifest`` if the committed one still has version ``token`` (step 3).

    The step's data must already be durable. Returns False if another writer committed first.
    """
    return await storage.put_if_unchanged(MANIFEST_KEY, manifest.to_bytes(), token)


async def collect_garbage(storage: Storage, old: Manifest, new: Manifest) -> list[str]:
    """Step 4: delete dropped steps and debris; returns the deleted names."""
    live = {s.dir for s in new.steps}
    dropped = {s.dir for s in old.steps} - live
    dead = []
    for name in await storage.list_dir(""):
        match = _STEP_DIR.match(name)
        if match and name not in live:
            created = int(match.group(2), 16) / 1000
            if name in dropped or await storage.is_abandoned(name, created):
                dead.append(name)
        elif name.startswith(MANIFEST_KEY + ".") and name.endswith(".partial"):
            dead.append(name)  # a crashed local commit's temporary manifest
    for name in dead:
        await storage.delete_dir(name)
    return dead
