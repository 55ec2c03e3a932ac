"""A local directory, written with plain files from zarrckpt's I/O threads.

zarr's ``LocalStore`` costs several times more per small file and never flushes to stable
storage, so local roots get this direct implementation: ``writev``/``readv`` on raw chunk
buffers (no copies), batches of small files per thread hop, and one ``syncfs`` per save.

Writers on one machine coordinate with ``flock``: the manifest is compared and replaced
under an exclusive lock on ``.zarrckpt.lock``, and each step directory being written holds
a lock on its ``.zarrckpt-writing`` file, which the kernel releases if the writer dies.
Where ``flock`` is missing (Windows) or refused (some NFS/Lustre mounts), the root falls
back to one writer at a time, and the commit says so once with a warning.

**Recycling.** In a save loop (the tutorial's: save every epoch, keep the latest), creating
and deleting thousands of inodes per save costs several times the data itself (on ext4
without a journal each create after mass deletion searches past recently freed inodes:
io-floors.md). So the step directory a commit drops becomes this process's *spare*
(``.spare-<name>``, at most one per root), and the next save renames it into place and
rewrites its files in place: in the steady state no inode is created or freed. Only a
directory this process created becomes its spare (never a step of a downloaded checkpoint,
nor another writer's). A spare holds an ``flock`` lease of its owning process, taken
*before* the rename that makes it one, so only that process ever rewrites it; once the
process is gone, the spare is debris like any other. Readers follow only the manifest,
and confirm after reading that their step directory still exists under its name, so a
recycled step is never read silently (:meth:`LocalStorage.step_exists`).

**Claims.** Every directory that leaves the step namespace does so by one atomic
``rename``: to ``.spare-<name>`` (under its lease) or to ``.trash-<name>.<random>``
before it is deleted. Two processes that both judge a directory garbage (the writer whose
commit dropped it, a ``zarrckpt gc``) therefore never both act on it: the second rename
fails, and an ``rmtree`` only ever runs on a ``.trash-`` name that nothing else can reach.

**Files are replaced, never rewritten through a link.** A recycled file is opened with
``O_NOFOLLOW``; one that is a symbolic link, not a regular file, or has other hard links
(``cp -al`` backups, ``rsync --link-dest``) is unlinked and created anew, so a write never
reaches a file outside this step. A ``zarr.json`` left as it is (the same bytes) must be
provably the very file this process wrote there: same inode, size and modification time.

Reads never leave the root: keys are checked (:func:`~.base.check_key`) and every opened
file's (and listed directory's) real path is compared with the root's before anything is
read from it, so a symbolic link planted in a downloaded checkpoint cannot make zarrckpt
read ``/etc/passwd``. Files are opened ``O_NONBLOCK | O_NOCTTY`` and must be regular
files, so a FIFO or a device planted there neither hangs the reader nor feeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .._manifest import SPARE_PREFIX, TRASH_PREFIX
from .._sync import batch_executor
from ..errors import CorruptCheckpointError, StoreError
from .base import Storage, check_key

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LocalStorage"]

_LEASE = ".zarrckpt-writing"
_LOCK = ".zarrckpt.lock"
#: errors of a filesystem that has no working flock (NFS without lockd, some Lustre mounts)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _views(buffers: Sequence[Any]) -> list[memoryview]:
    return [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of a vectored I/O's buffers (after a partial readv/writev)."""
    while views and n >= views[0].nbytes:
        n -= views[0].nbytes
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]


def _open_for_writing(path: str, top: str | None = None) -> int:
    """An fd to write ``path`` in place, if it is a plain file of its own; else anew.

    ``O_NOFOLLOW`` refuses a symbolic link, ``O_NONBLOCK`` a FIFO without a reader
    (``ENXIO``, as a socket); whatever is not a regular file with one link (a device, a
    file shared with a ``cp -al`` backup) is unlinked and replaced by a new file, so a
    write only ever reaches this step's own bytes. Missing directories are created, but
    never ``top`` (a leased step directory): one that vanished was claimed by a collector,
    and writing on would commit an incomplete step.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:  # first file of a directory: create it (and any parents)
        if top is not None and _dir_identity(top) is None:
            raise FileNotFoundError(
                errno.ENOENT, "the step directory vanished while being written", top
            ) from None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise
        fd = -1
    if fd >= 0:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
    os.unlink(path)
    return os.open(path, flags | os.O_EXCL, 0o644)


def _dir_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the directory ``path`` itself (None: missing, a link, a file)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _same_dir(path: str, mine: _Mine) -> bool:
    """Whether ``path`` is the very directory ``mine`` describes (never a missing one)."""
    found = _dir_identity(path)
    return found is not None and found == mine.dir


def _rmtree(path: str) -> None:
    """Delete a claimed tree; what another collector deleted first is no error."""

    def skip_missing(func: Any, name: str, exc: Any) -> None:
        error = exc if isinstance(exc, BaseException) else exc[1]
        if not isinstance(error, FileNotFoundError):
            raise error

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=skip_missing)
    else:
        shutil.rmtree(path, onerror=skip_missing)


def _write_all(fd: int, parts: Sequence[Any]) -> int:
    views = _views(parts)
    total = sum(v.nbytes for v in views)
    while views:
        _advance(views, os.writev(fd, views))
    return total


_libc: Any = None


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (one call, ~50 ms) and report write-back errors."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs  # noqa: B018 - probe
        except (OSError, AttributeError):
            _libc = False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc and _libc.syncfs(fd) == 0:
            return
        if _libc:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
        os.sync()  # no syncfs (not Linux): flush everything
    finally:
        os.close(fd)


_PROC_FD = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")

#: A file's identity as this process wrote it: (inode, size, modification time in ns).
_Identity = tuple[int, int, int]


@dataclass
class _Mine:
    """A step directory this process created: the directory's (device, inode), and the
    identity of each file written or linked there (keys relative to it; None: forgotten).
    ``dir`` is None if the directory was no longer there, a directory, just after it was made."""

    dir: tuple[int, int] | None
    written: dict[str, _Identity] | None


#: Step directories this process created, per (real root, directory name): only these may
#: become spares. The newest ``_OWN_PER_ROOT`` per root are remembered, the file
#: identities of the newest ``_WRITTEN_PER_ROOT`` only (the next commit drops one of those
#: with ``keep=1``; with more kept, incremental saves link the unchanged documents anyway).
_own: dict[tuple[str, str], _Mine] = {}
_OWN_PER_ROOT = 1024
_WRITTEN_PER_ROOT = 2
#: This process's spare per root (real path): (directory name, fd holding its lease, what
#: this process knows of it).
_spares: dict[str, tuple[str, int, _Mine]] = {}
#: Guards ``_own`` and ``_spares``: saves of one process may run on several threads.
_bookkeeping = threading.Lock()


def _forget_spares_after_fork() -> None:
    global _bookkeeping
    _bookkeeping = threading.Lock()  # a parent's thread may have held it
    for _, fd, _ in _spares.values():
        with contextlib.suppress(OSError):
            os.close(fd)  # the lock stays the parent's, and ends with it
    _spares.clear()  # the parent's spares stay the parent's
    _own.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spares_after_fork)


def _recycling_enabled() -> bool:
    return os.environ.get("ZARRCKPT_RECYCLE", "1") != "0"


class LocalStorage(Storage):
    """A local directory."""

    durable = True
    batches_small_io = True
    reads_into = True
    zero_copy_writes = True
    default_chunk_bytes = 64 * 1024 * 1024
    conditional_writes = leases = fcntl is not None

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.leases = self.conditional_writes = fcntl is not None  # per instance: see _flock
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self._prefix = os.path.join(self.url, "")  # (what os.path.join(url, key) starts with)
        self._leases: dict[str, int] = {}
        self._real_root: str | None = None

    def _path(self, key: str) -> str:
        # (a checked key is relative: what os.path.join does, without its cost per call)
        return self._prefix + check_key(self.url, key) if key else self.url

    async def _run(self, op: str, key: str, fn: Any, *args: Any) -> Any:
        async with self.errors(op, key):
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _run_batch(self, op: str, fn: Any, *args: Any) -> Any:
        async with self.errors(op, ""):
            return await asyncio.get_running_loop().run_in_executor(batch_executor(), fn, *args)

    # --- reads (confined to the root) ------------------------------------------------------

    def _check_inside(self, real: str, path: str) -> None:
        """Refuse ``path`` if its real location ``real`` is outside the root (a symlink)."""
        if self._real_root is None:
            self._real_root = os.path.join(os.path.realpath(self.root), "")
        if not os.path.join(real, "").startswith(self._real_root):
            raise CorruptCheckpointError(
                f"{path} resolves to {real}, outside the checkpoint root {self.url}; "
                "refusing to read it (a symbolic link in the checkpoint?)"
            )

    def _confine(self, fd: int, path: str) -> None:
        """Refuse an opened file or directory whose real location is outside the root."""
        real = os.readlink(f"/proc/self/fd/{fd}") if _PROC_FD else os.path.realpath(path)
        self._check_inside(real, path)

    def _open_failed(self, path: str, exc: OSError) -> NoReturn:
        """Raise the right error for a failed open: the checkpoint's fault or the store's."""
        if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            raise CorruptCheckpointError(
                f"{path}: {exc.strerror} (a loop of symbolic links, or a name no checkpoint "
                "can have); refusing to read it"
            ) from None
        self._check_inside(os.path.realpath(path), path)  # e.g. a link to an unreadable file
        raise exc

    def _open_read(self, key: str) -> int | None:
        """An fd for reading ``key``, or None if it is missing or a directory.

        ``O_NONBLOCK`` and the regular-file check keep a FIFO or a device planted in a
        checkpoint from hanging or feeding the reader (``O_NOCTTY``: a terminal never
        becomes the process's controlling one). A UNIX socket cannot be opened at all
        (``ENXIO``, as a device without a driver): the checkpoint's fault too.
        """
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                self._check_inside(os.path.realpath(path), path)
                raise CorruptCheckpointError(
                    f"{path} is not a regular file (a socket or a device); refusing to read it"
                ) from None
            self._open_failed(path, exc)
        try:
            self._confine(fd, path)
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                if stat.S_ISDIR(mode):
                    os.close(fd)
                    return None
                raise CorruptCheckpointError(f"{path} is not a regular file; refusing to read it")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _get(self, key: str, limit: int | None = None) -> bytes | None:
        fd = self._open_read(key)
        if fd is None:
            return None
        with open(fd, "rb", buffering=0) as f:
            if limit is None:
                return f.read()
            size = os.fstat(fd).st_size
            if size > limit:  # refused from its size: nothing is read (a sparse 1 GiB file)
                raise self.too_large(key, size, limit)
            data = f.read(size + 1)  # one more than fstat said: a short read is the end
            if len(data) > size:  # it grew since: read on, never past the limit
                data += f.read(limit + 1 - len(data))
                if len(data) > limit:
                    raise self.too_large(key, None, limit)
            return data

    async def get(self, key: str, limit: int | None = None) -> bytes | None:
        return await self._run("reading", key, self._get, key, limit)

    def read_into(self, key: str, buffers: list[Any]) -> int | None:
        """Fill ``buffers`` in order from the file (``readv``); bytes in the file, or None."""
        fd = self._open_read(key)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            views = _views(buffers)
            while views:
                n = os.readv(fd, views)
                if n == 0:  # a short file: the caller compares ``size`` with what it expects
                    break
                _advance(views, n)
            return size
        finally:
            os.close(fd)

    def _get_batch(
        self, items: Sequence[tuple[str, Callable[[bytes | None], None]]], limit: int | None
    ) -> None:
        for key, consume in items:
            consume(self._get(key, limit))

    async def get_batch(
        self, items: Sequence[tuple[str, Callable[[bytes | None], None]]], limit: int | None = None
    ) -> None:
        await self._run_batch("reading", self._get_batch, items, limit)

    # --- writes ----------------------------------------------------------------------------

    def _put(self, key: str, parts: Sequence[Any]) -> None:
        # No O_TRUNC: a recycled file is overwritten in place (truncating frees its blocks
        # and the write allocates them again, the largest cost of a recycled save in a
        # profile), and cut only where the new content is shorter (a compressed chunk).
        step_dir, _, rest = key.partition("/")
        fd = _open_for_writing(  # a leased step directory is never re-created
            self._path(key), self._path(step_dir) if step_dir in self._leases else None
        )
        try:
            written = _write_all(fd, parts)
            st = os.fstat(fd)
            if st.st_size > written:
                os.ftruncate(fd, written)
                st = os.fstat(fd)
            self._remember(step_dir, rest, st)
        finally:
            os.close(fd)

    def _remember(self, step_dir: str, rest: str, st: os.stat_result) -> None:
        """Note the identity of a file written or linked into one of this process's steps
        (key ``rest`` relative to ``step_dir``)."""
        mine = _own.get((self._real(), step_dir))
        written = mine.written if mine is not None else None  # once: another save may drop it
        if written is not None and rest:
            written[rest] = (st.st_ino, st.st_size, st.st_mtime_ns)

    def _noted(self, step_dir: str) -> dict[str, _Identity]:
        """The identities :meth:`_remember` noted in ``step_dir`` (none: not one of ours)."""
        mine = _own.get((self._real(), step_dir))
        return (mine.written if mine is not None else None) or {}

    def _still(self, step_dir: str, noted: Iterable[tuple[str, _Identity]]) -> set[str]:
        """The keys of ``noted`` (relative to ``step_dir``: ones :meth:`_remember` noted, so
        checked when written) whose file is still the regular file of that identity: one
        ``lstat`` each (relative to the directory: a save checks thousands)."""
        try:
            fd = os.open(self._path(step_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return set()
        found = set()
        try:
            for key, identity in noted:
                try:
                    st = os.lstat(key, dir_fd=fd)
                except OSError:
                    continue
                if (st.st_ino, st.st_size, st.st_mtime_ns) == identity and stat.S_ISREG(st.st_mode):
                    found.add(key)
        finally:
            os.close(fd)
        return found

    def _intact(self, step_dir: str, keys: frozenset[str]) -> frozenset[str]:
        written = self._noted(step_dir)
        return frozenset(self._still(step_dir, [(k, written[k]) for k in keys if k in written]))

    async def intact(self, step_dir: str, keys: frozenset[str]) -> frozenset[str]:
        return await self._run("recycling", step_dir, self._intact, step_dir, keys)

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        await self._run("writing", key, self._put, key, parts)

    def _put_batch(self, items: Sequence[tuple[str, Callable[[], Sequence[Any]]]]) -> None:
        for key, make in items:
            self._put(key, make())

    async def put_batch(self, items: Sequence[tuple[str, Callable[[], Sequence[Any]]]]) -> None:
        await self._run_batch("writing", self._put_batch, items)

    def _link_many(self, src_dir: str, dst_dir: str, keys: Sequence[str]) -> set[str]:
        failed = set()
        shared = self._shared(src_dir, dst_dir, keys)
        own = (self._real(), src_dir) in _own  # a step of this process: no link planted there
        inside: dict[str, bool] = {}  # else each source directory is checked
        for key in keys:
            if key in shared:
                continue
            src = f"{src_dir}/{key}"
            if not own:
                where = os.path.dirname(src)
                if where not in inside:
                    inside[where] = self._inside_real(src)
            if not ((own or inside[where]) and self._link(src, f"{dst_dir}/{key}")):
                failed.add(key)
        return failed

    def _inside_real(self, key: str) -> bool:
        """Whether the directory of ``key`` really lies in the root (no linked components)."""
        real = os.path.realpath(os.path.dirname(self._path(key)))
        return os.path.join(real, "").startswith(self._real())

    def _shared(self, src_dir: str, dst_dir: str, keys: Sequence[str]) -> set[str]:
        """The ``keys`` whose file in ``dst_dir`` already is the one this process wrote or
        linked as the file in ``src_dir``.

        The save loop's usual case: an unchanged file of a recycled spare was linked from
        the step before it, which the latest step links too. One ``lstat`` (instead of a
        failing ``link`` between two) shows that ``dst`` is still that very file, unmodified
        (inode, size and modification time as noted); its bytes are then the ones the save
        wants, whatever happened to ``src`` since.
        """
        sources, targets = self._noted(src_dir), self._noted(dst_dir)
        candidates = [
            (key, identity)
            for key in keys
            if (identity := sources.get(key)) is not None and targets.get(key) == identity
        ]
        return self._still(dst_dir, candidates)

    def _link(self, src: str, dst: str) -> bool:
        """Hard-link the regular file ``src`` as ``dst`` (replacing what is there)."""
        source, target = self._path(src), self._path(dst)
        step, _, rest = dst.partition("/")
        try:
            st = os.lstat(source)
        except OSError:
            return False  # gone (another writer's commit dropped that step): write it
        if not stat.S_ISREG(st.st_mode):
            return False
        for _ in range(2):
            try:
                os.link(source, target, follow_symlinks=False)
                with contextlib.suppress(OSError):  # gone at once: then nothing is noted
                    self._remember(step, rest, os.lstat(target))  # what was linked, not ``st``
                return True
            except FileExistsError:
                there = os.lstat(target)
                if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
                    self._remember(step, rest, there)
                    return True  # a recycled spare already shares it
                os.unlink(target)
            except FileNotFoundError:
                if not os.path.exists(source):
                    return False
                if _dir_identity(self._path(step)) is None:
                    return False  # the step directory was claimed (or the save failed): the
                    # write that follows says so (never re-create it: _open_for_writing)
                os.makedirs(os.path.dirname(target), exist_ok=True)
            except OSError:  # EXDEV, EMLINK, a file system without hard links: write it
                return False
        return False

    async def link_many(self, src_dir: str, dst_dir: str, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        return await self._run_batch("linking", self._link_many, src_dir, dst_dir, keys)

    def _put_atomic(self, key: str, data: bytes) -> None:
        path = self._path(key)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, [data])
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive power loss
        finally:
            os.close(dir_fd)

    async def put_atomic(self, key: str, data: bytes) -> None:
        await self._run("writing", key, self._put_atomic, key, data)

    def _list_dir(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            self._open_failed(path, exc)
        try:
            self._confine(fd, path)
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    async def list_dir(self, prefix: str = "") -> list[str]:
        return await self._run("listing", prefix, self._list_dir, prefix)

    def _delete_dir(self, prefix: str) -> None:
        """Delete a directory of the root: claimed first by a rename to a ``.trash-`` name
        (see "Claims" above); if another process renamed it first, it is that one's."""
        path = self._path(prefix)
        with _bookkeeping:
            _own.pop((self._real(), prefix), None)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)  # a link or a file: never followed out of the root
            return
        if not os.path.basename(prefix).startswith(TRASH_PREFIX):
            trash = self._path(f"{TRASH_PREFIX}{os.path.basename(prefix)}.{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return  # claimed by another process (a spare, or its deletion)
            path = trash
        _rmtree(path)

    async def delete_dir(self, prefix: str) -> None:
        await self._run("deleting", prefix, self._delete_dir, prefix)

    async def sync(self, keys: Sequence[str] = ()) -> None:
        if keys:
            for key in keys:
                await self._run("flushing", key, self._fsync, key)
        elif self.root.exists():
            await self._run("flushing", "", _syncfs, self.root)

    def _fsync(self, key: str) -> None:
        """Flush one file and its directory (which holds its name)."""
        path = self._path(key)
        for target, flags in ((path, os.O_RDONLY), (os.path.dirname(path), os.O_DIRECTORY)):
            fd = os.open(target, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def is_file(self) -> bool:
        return self.root.exists() and not self.root.is_dir()

    # --- commit support --------------------------------------------------------------------

    def _flock(self, fd: int, flags: int) -> bool:
        """Lock ``fd``; False where this filesystem has no working flock (then no more tries)."""
        if not self.leases or fcntl is None:
            self.leases = self.conditional_writes = False
            return False
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            self.leases = self.conditional_writes = False  # one writer at a time from now on
            return False
        return True

    def _put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self._path(_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            locked = self._flock(fd, fcntl.LOCK_EX if fcntl else 0)
            if self._get(key) != token:
                return False
            if locked:  # no other publisher is between its temp file and its rename now
                self._remove_crashed_partials(key)
            self._put_atomic(key, data)
            return True
        finally:
            os.close(fd)  # releases the lock

    def _remove_crashed_partials(self, key: str) -> None:
        """Temp files of commits that crashed before their rename (``_put_atomic``)."""
        parent, name = os.path.split(self._path(key))
        for entry in os.listdir(parent):
            if entry.startswith(name + ".") and entry.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(parent, entry))

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        return await self._run("committing", key, self._put_if_unchanged, key, data, token)

    def _real(self) -> str:
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root) + os.sep
        return self._real_root

    def _take_spare(self, tmp: str) -> tuple[int, bytes, _Mine] | None:
        """Rename this process's spare to ``tmp``: (its lease fd, its old step record, what
        this process knows of it). Only the very directory it made a spare qualifies."""
        with _bookkeeping:
            found = _spares.pop(self._real(), None)
        if found is None:
            return None
        name, fd, mine = found
        try:
            os.rename(self._path(name), tmp)
            if not _same_dir(tmp, mine):
                raise OSError(errno.ESTALE, "not the spare this process made", tmp)
            record_fd = os.open(os.path.join(tmp, "zarr.json"), os.O_RDONLY | os.O_NOFOLLOW)
            with open(record_fd, "rb") as f:
                return fd, f.read(), mine
        except OSError:  # gone, replaced or damaged: start afresh
            os.close(fd)
            with contextlib.suppress(OSError):
                self._delete_dir(os.path.basename(tmp))
            return None

    def _begin_step(self, step_dir: str, recycle: bool) -> bytes | None:
        # The directory appears (by rename) with its lease already locked, so a step
        # directory without a lease file is always a finished one.
        tmp = self._path(f".tmp-{step_dir}")
        spare = self._take_spare(tmp) if recycle and self.recycles else None
        if spare is not None:
            fd, old_record, mine = spare
            self._leases[step_dir] = fd  # the spare's lease file is the step's lease now
        else:
            if not recycle:
                self._drop_spares()
            old_record = None
            os.makedirs(tmp)
            mine = _Mine(_dir_identity(tmp), {})
            fd = os.open(os.path.join(tmp, _LEASE), os.O_RDWR | os.O_CREAT, 0o644)
            if self._flock(fd, fcntl.LOCK_EX if fcntl else 0):
                self._leases[step_dir] = fd
            else:
                os.close(fd)
        os.rename(tmp, self._path(step_dir))
        self._adopt(step_dir, mine)
        return old_record

    def _adopt(self, step_dir: str, mine: _Mine) -> None:
        """Remember ``step_dir`` as this process's, forgetting vanished and the oldest ones."""
        real = self._real()
        with _bookkeeping:
            for key in [key for key in _own if key[0] == real]:
                if not os.path.isdir(self._path(key[1])):
                    del _own[key]
            if mine.written is None:  # a spare whose identities were forgotten: a new life
                mine.written = {}
            _own[(real, step_dir)] = mine
            ours = [key for key in _own if key[0] == real]  # oldest first
            for key in ours[: max(0, len(ours) - _OWN_PER_ROOT)]:
                del _own[key]  # cannot become a spare now: deleted instead, when dropped
            for key in ours[: max(0, len(ours) - _WRITTEN_PER_ROOT)]:
                if key in _own:
                    _own[key].written = None

    async def begin_step(self, step_dir: str, recycle: bool = False) -> bytes | None:
        return await self._run("writing", step_dir, self._begin_step, step_dir, recycle)

    @property
    def recycles(self) -> bool:  # type: ignore[override]
        return self.leases and _recycling_enabled()

    def _make_spare(self, step_dir: str) -> bool:
        """Turn ``step_dir`` (dropped, or this writer's lost one) into this process's spare.

        Only the very directory this process created qualifies (same device and inode: a
        link put in its place is not followed). The lease is held *before* the rename (a
        losing writer keeps the one it holds), so the spare is never without one; a
        collector that claimed the directory first makes the rename fail.
        """
        real = self._real()
        with _bookkeeping:  # one spare per root, even when saves run on several threads
            mine = _own.get((real, step_dir))
            if not self.recycles or real in _spares or mine is None:
                return False
            path = self._path(step_dir)
            if not _same_dir(path, mine):
                return False
            fd = self._leases.pop(step_dir, None)
            if fd is None:
                try:
                    fd = os.open(
                        os.path.join(path, _LEASE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644
                    )
                except OSError:  # claimed by a collector (renamed away) meanwhile
                    return False
                try:
                    locked = self._flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # someone holds it: not a finished step after all
                    locked = False
                if not locked:
                    os.close(fd)
                    return False
            name = SPARE_PREFIX + step_dir
            try:
                os.rename(path, self._path(name))
                if not _same_dir(self._path(name), mine):  # swapped in between
                    raise OSError(errno.ESTALE, "not the directory this process made", name)
            except OSError:
                os.close(fd)
                return False
            _spares[real] = (name, fd, _own.pop((real, step_dir)))
            return True

    async def make_spare(self, step_dir: str) -> bool:
        return await self._run("recycling", step_dir, self._make_spare, step_dir)

    def _drop_spares(self) -> None:
        with _bookkeeping:
            found = _spares.pop(self._real(), None)
        if found is not None:
            name, fd, _ = found
            try:
                self._delete_dir(name)
            finally:
                os.close(fd)

    async def drop_spares(self) -> None:
        await self._run("deleting", "", self._drop_spares)

    def _trim(self, step_dir: str, keep: set[str]) -> None:
        top = self._path(step_dir)
        keep = {os.path.join(top, key) for key in keep} | {os.path.join(top, _LEASE)}
        for dirpath, dirnames, filenames in os.walk(top, topdown=False):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if path not in keep:
                    os.unlink(path)
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):  # never written through: see "Files are replaced"
                    os.unlink(path)
                    continue
                with contextlib.suppress(OSError):  # not empty: still used
                    os.rmdir(path)

    async def trim(self, step_dir: str, keep: set[str]) -> None:
        await self._run("recycling", step_dir, self._trim, step_dir, keep)

    async def step_exists(self, step_dir: str) -> bool:
        return os.path.isdir(self._path(step_dir))

    def _check_lease(self, step_dir: str) -> None:
        fd = self._leases.get(step_dir)
        if fd is None:
            return
        held = os.fstat(fd)
        try:
            there = os.lstat(self._path(f"{step_dir}/{_LEASE}"))
        except OSError:
            there = None
        if there is None or (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino):
            raise StoreError(
                f"{self.describe(step_dir)} was removed or replaced while this save wrote it "
                "(a `zarrckpt gc` or cleanup job of another user?); nothing was committed"
            )

    async def check_lease(self, step_dir: str) -> None:
        await self._run("committing", step_dir, self._check_lease, step_dir)

    def _end_step(self, step_dir: str) -> None:
        fd = self._leases.pop(step_dir, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(f"{step_dir}/{_LEASE}"))
        if fd is not None:
            os.close(fd)

    async def end_step(self, step_dir: str) -> None:
        await self._run("writing", step_dir, self._end_step, step_dir)

    def _lease_expired(self, step_dir: str, created: float) -> bool:
        # Read-only: locking needs no write permission, so a collector run by another user
        # judges leases as the writer's own process would.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self._path(f"{step_dir}/{_LEASE}"), flags)
        except (FileNotFoundError, NotADirectoryError):
            # No lease: a finished step, or a ``.tmp-`` directory of a writer that died
            # before creating its lease.
            return not step_dir.startswith(".tmp-") or time.time() - created > 60
        except OSError as exc:
            # A link is never a lease zarrckpt wrote; anything else (no permission, out of
            # descriptors) means this process cannot judge: not garbage.
            return exc.errno == errno.ELOOP
        try:
            if not self.leases:
                return time.time() - created > 3600  # no locks here: judge by age only
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is alive
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            return time.time() - created > 3600
        finally:
            os.close(fd)
        # Unlocked. A ``.tmp-`` directory's writer creates the lease file, then locks it:
        # in between it looks unlocked, so such a directory gets the same minute's grace.
        return not step_dir.startswith(".tmp-") or time.time() - created > 60

    async def lease_expired(self, step_dir: str, created: float) -> bool:
        return await self._run("listing", step_dir, self._lease_expired, step_dir, created)
