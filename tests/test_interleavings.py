"""Deterministic interleavings of a writer (this process), and a collector or a second writer
(another process: tests/interleave_worker.py), on the real code with the defaults (keep=1,
recycle=True).

Each party is paused at an os-level call, never at a private function, so these tests outlive
rewrites of the protocol: the writer here after one of its *coordination calls* (renames,
deletions, directories made directly under the root, opens of hidden control files or exclusive
creates, ``flock``, closing such a file) on the root, the other process before one of its
deletions. Each test asserts behaviour only: afterwards every committed step has all its files,
``zarrckpt verify --all`` passes and the latest step loads bit-exactly what its writer saved.

The named tests pause each party at one race point of the issue (#16); the ``every_point``
tests pause the writer after each of its coordination calls in turn.
"""

import contextlib
import fcntl
import io
import json
import os
import queue
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import stress_worker as sw
from interleave_worker import CHUNK_BYTES, SMALL

import zarrckpt
from zarrckpt.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WAIT = 20  # seconds any party may take to reach its next pause or finish


def tree(step: int, wid: int, seq: int) -> dict:
    return sw.make_tree(step, wid, seq, **SMALL)


def save(root: Path, step: int, wid: int, seq: int, recycle: bool = True) -> str:
    """A save as the interleaving tests' writer makes it (warnings are not errors here);
    ``recycle=False`` leaves this process without a spare, as a fresh process would be."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        where = zarrckpt.save_pytree(
            str(root),
            tree(step, wid, seq),
            step=step,
            overwrite=True,
            verbose=False,
            chunk_bytes=CHUNK_BYTES,
            recycle=recycle,
        )
    return os.path.basename(where.rstrip("/"))


# --- the other process ----------------------------------------------------------------------


class Other:
    """tests/interleave_worker.py: a collector or a second writer in another process."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
        env.pop("ZARRCKPT_RECYCLE", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "interleave_worker.py")],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.next(60)["event"] == "ready"
        self.paused = False

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exited", "stderr": self.proc.stderr.read()[-3000:]})

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float) -> dict | None:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        assert event["event"] not in ("exited", "error"), event
        return event

    def start(self, timeout: float = 3, **cmd) -> dict | None:
        """Send a command; its first event (paused or done), or None if it is still busy
        after ``timeout`` (blocked, e.g. on a lock the paused writer holds)."""
        self.send(**cmd)
        event = self.next(timeout)
        self.paused = event is not None and event["event"] == "paused"
        return event

    def finish(self) -> dict:
        """Let a paused or busy command go on; its done event."""
        if self.paused:
            self.send(cmd="resume")
            self.paused = False
        event = self.next(WAIT)
        assert event is not None and event["event"] == "done", f"other process stuck: {event}"
        return event

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send(cmd="resume")
            self.send(cmd="quit")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def other():
    party = Other()
    yield party
    party.close()


# --- pausing this process's writer at its coordination calls --------------------------------


@dataclass
class Call:
    index: int
    name: str
    paths: tuple[str, ...]

    def __str__(self) -> str:
        return f"#{self.index} {self.name}({', '.join(self.paths)})"


@dataclass
class Pauser:
    """Counts this process's coordination calls on ``root`` and pauses after chosen ones.

    ``plan`` holds predicates on :class:`Call`; the writer pauses after the first call matching
    the first predicate, then after the first later call matching the second, and so on.
    """

    root: str = ""
    plan: list[Callable[[Call], bool]] = field(default_factory=list)
    trace: list[Call] = field(default_factory=list)
    fds: dict[int, str] = field(default_factory=dict)
    paused: threading.Event = field(default_factory=threading.Event)
    resumed: threading.Event = field(default_factory=threading.Event)
    at: Call | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, root: Path, plan: list[Callable[[Call], bool]]) -> None:
        with self.lock:
            self.root = str(root) + os.sep
            self.plan = list(plan)
            self.trace = []
            self.fds = {}
            self.at = None
            self.paused.clear()

    def disarm(self) -> None:
        with self.lock:
            self.root = ""
            self.plan = []
        self.resumed.set()

    def rel(self, path) -> str | None:
        if not self.root:
            return None
        if isinstance(path, int):
            return self.fds.get(path)
        path = os.fsdecode(path)
        if path.startswith(self.root) and path.rstrip(os.sep) + os.sep != self.root:
            return os.path.relpath(path, self.root)
        return None  # elsewhere, or the root itself

    def called(self, name: str, paths: tuple[str, ...]) -> None:
        with self.lock:
            call = Call(len(self.trace), name, paths)
            self.trace.append(call)
            if not (self.plan and self.plan[0](call)):
                return
            self.plan.pop(0)
            self.at = call
            self.resumed.clear()
            self.paused.set()
        if not self.resumed.wait(120):
            raise RuntimeError(f"writer paused after {call} was never resumed")

    def resume(self) -> None:
        self.paused.clear()
        self.resumed.set()


def _hidden(rel: str) -> bool:
    return os.path.basename(rel).startswith(".")


@pytest.fixture
def pauser(monkeypatch):
    """Hooks os.rename/replace/unlink/remove/rmdir/mkdir/open/close and fcntl.flock."""
    p = Pauser()

    def paths_of(*args) -> tuple[str, ...] | None:
        rels = [p.rel(a) for a in args]
        return tuple(r for r in rels if r is not None) or None

    def wrap(module, name, select):
        original = getattr(module, name)

        def hooked(*args, **kwargs):
            # which call counts is decided before it runs (a close forgets its fd)
            picked = select(args, kwargs) if p.root else None
            try:
                result = original(*args, **kwargs)
            except BaseException:
                if picked:
                    p.called(name + "!", picked)
                raise
            if picked:
                if name == "open" and isinstance(result, int):
                    p.fds[result] = picked[0]
                p.called(name, picked)
            return result

        monkeypatch.setattr(module, name, hooked)

    def by_path(args, kwargs):
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
            return (f"<fd>/{os.fsdecode(args[0])}",)  # rmtree's calls relative to a directory
        return paths_of(*args[:2])

    def mkdir(args, kwargs):  # only directories made directly under the root
        rel = p.rel(args[0])
        return (rel,) if rel is not None and os.sep not in rel.strip(os.sep) else None

    def open_(args, kwargs):
        rel = p.rel(args[0]) if kwargs.get("dir_fd") is None else None
        flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
        if rel is not None and (_hidden(rel) or flags & os.O_EXCL):
            return (rel,)
        return None

    def by_fd(args, kwargs):
        rel = p.fds.get(args[0]) if isinstance(args[0], int) else None
        return (rel,) if rel is not None else None

    def close(args, kwargs):
        rel = p.fds.pop(args[0], None) if isinstance(args[0], int) else None
        return (rel,) if rel is not None else None

    for name in ("rename", "replace", "unlink", "remove", "rmdir"):
        wrap(os, name, by_path)
    wrap(os, "mkdir", mkdir)
    wrap(os, "open", open_)
    wrap(os, "close", close)
    wrap(fcntl, "flock", by_fd)
    yield p
    p.disarm()


class Writer:
    """This process's writer, in a thread, so the test can act while it is paused."""

    def __init__(self, pauser: Pauser, fn: Callable[[], object]) -> None:
        self.pauser = pauser
        self.result: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()
            self.pauser.paused.set()  # wakes a test waiting for the next pause

    def next_pause(self) -> Call | None:
        """Wait until the writer pauses (the call it paused after) or finishes (None)."""
        assert self.pauser.paused.wait(WAIT), "the writer neither paused nor finished"
        if self.done.is_set():
            return None
        return self.pauser.at

    def go_on(self) -> None:
        self.pauser.resume()

    def join(self) -> None:
        self.pauser.plan = []
        self.pauser.resume()
        self.thread.join(WAIT)
        assert self.done.is_set(), "the writer did not finish"


def reference_files(tmp_path: Path) -> set[str]:
    where = zarrckpt.save_pytree(
        str(tmp_path / "reference"),
        tree(0, 0, 0),
        verbose=False,
        recycle=False,
        chunk_bytes=CHUNK_BYTES,
    )
    return sw.step_files(where)


def damage(root: Path, ref: set[str], latest: tuple[int, int, int]) -> list[str]:
    """What is wrong with the committed steps of ``root`` (nothing runs on it now)."""
    problems = []
    manifest = sw.listed(sw.manifest_bytes(str(root)))
    for name, step in sorted(manifest.items()):
        missing = ref - sw.step_files(root / name)
        if missing:
            problems.append(
                f"committed step {step} ({name}) misses {len(missing)} files: {sorted(missing)[:6]}"
            )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["verify", "--all", str(root)])
    if rc != 0:
        problems.append(
            f"zarrckpt verify --all: exit {rc}: {(out.getvalue() + err.getvalue())[-600:]}"
        )
    try:
        got = zarrckpt.load_pytree(str(root))
    except Exception as exc:
        problems.append(f"loading the latest step: {type(exc).__name__}: {exc}")
    else:
        bad = sw.mismatch(got, *latest, **SMALL)
        if bad:
            problems.append(f"latest step is not {latest}: {bad}")
    return problems


def forget_spare(root: Path) -> None:
    """At the end of a run: let this process's spare on ``root`` go (a save without recycling
    deletes it), closing its lease's fd."""
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarrckpt.save_pytree(
            str(root),
            tree(99, 9, 9),
            step=99,
            verbose=False,
            recycle=False,
            chunk_bytes=CHUNK_BYTES,
        )


def after_publish(c: Call) -> bool:
    """The writer has just replaced the manifest (the step it dropped is no longer listed)."""
    return c.name in ("rename", "replace") and c.paths[-1] == "zarr.json"


def begun(c: Call) -> bool:
    """The writer's step directory has appeared under its step name."""
    name = os.path.basename(c.paths[-1])
    return c.name in ("rename", "replace", "mkdir") and name.startswith("step_")


def lease_released(c: Call) -> bool:
    """The writer has let go of its step directory's lease (unlinked or closed the lease file
    of a ``step_`` directory)."""
    return (
        c.name in ("close", "unlink")
        and os.path.basename(c.paths[0]) == ".zarrckpt-writing"
        and os.path.basename(os.path.dirname(c.paths[0])).startswith("step_")
    )


def new_directory_lease_opened(c: Call) -> bool:
    """The writer has opened (created) a hidden control file inside a directory it made
    directly under the root: its new step directory's lease, not yet locked."""
    return c.name == "open" and c.paths[0].count(os.sep) == 1 and _hidden(c.paths[0])


# --- the dropping writer and a collector ----------------------------------------------------


def dropping_save_with_collector(
    root: Path, pauser: Pauser, other: Other, when: Callable[[Call], bool], mode: str | None
) -> list[str]:
    """Step 1 exists (the writer has no spare); the writer saves step 2, which drops step 1,
    and pauses after the first call ``when`` matches; meanwhile the collector runs (paused
    before its first deletion if ``mode``); the writer finishes, saves step 3 (recycling
    what it can), then the collector finishes. Returns what happened, for the messages."""
    save(root, 1, 1, 2, recycle=False)
    pauser.arm(root, [when])
    writer = Writer(pauser, lambda: save(root, 2, 1, 3))
    at = writer.next_pause()
    story = [f"writer paused after {at}" if at else "writer never paused"]
    if at is not None:
        event = other.start(cmd="gc", root=str(root), pause=mode)
        story.append(f"collector: {event}")
        writer.join()
    else:
        writer.join()
        event = other.start(cmd="gc", root=str(root), pause=mode)
        story.append(f"collector (after the save): {event}")
    pauser.disarm()
    if writer.error is not None:
        story.append(f"writer's save 2 raised {writer.error!r}")
    try:
        save(root, 3, 1, 4)
    except Exception as exc:
        story.append(f"writer's save 3 raised {exc!r}")
    done = other.finish() if (event is None or event["event"] != "done") else event
    story.append(f"collector done: {done.get('debris')} {done.get('error', '')}")
    return story


def _check(root: Path, ref: set[str], latest, story: list[str]) -> None:
    problems = damage(root, ref, latest)
    raised = [s for s in story if "raised" in s]
    assert not problems and not raised, "\n".join(["", *story, "", *problems])


def test_collector_about_to_delete_a_dropped_step_that_its_writer_recycles(tmp_path, pauser, other):
    """A collector has judged the step a commit just dropped garbage (unlisted, no lease) and
    is about to delete it, while the dropping writer makes it its spare and recycles it into
    the next committed step."""
    ref = reference_files(tmp_path)
    root = tmp_path / "root"
    story = dropping_save_with_collector(root, pauser, other, after_publish, "first-delete")
    _check(root, ref, (3, 1, 4), story)
    forget_spare(root)


def test_collector_rmtree_under_way_when_the_dropped_step_is_renamed(tmp_path, pauser, other):
    """The collector's rmtree of the dropped step has opened and listed it when the writer
    renames it to its spare and rewrites it as the next committed step; the rmtree goes on."""
    ref = reference_files(tmp_path)
    root = tmp_path / "root"
    story = dropping_save_with_collector(root, pauser, other, after_publish, "inside-delete")
    _check(root, ref, (3, 1, 4), story)
    forget_spare(root)


def test_collector_while_a_writer_creates_its_step_directory(tmp_path, pauser, other):
    """A collector runs to completion while a writer has created its new step directory and
    the lease file in it, but not locked it yet: the save must still succeed, intact."""
    ref = reference_files(tmp_path)
    root = tmp_path / "root"
    story = dropping_save_with_collector(root, pauser, other, new_directory_lease_opened, None)
    _check(root, ref, (3, 1, 4), story)
    forget_spare(root)


def losing_save_with_collector(
    root: Path, pauser: Pauser, other: Other, when: Callable[[Call], bool], mode: str | None
) -> list[str]:
    """Step 0 exists; this process saves step 1, and after its step directory appears the other
    process saves step 1 first, so this save loses (ConcurrentWriteError); it pauses again after
    the first later call ``when`` matches, while the other process collects (paused before its
    first deletion if ``mode``); then this process saves step 2 and the collector finishes."""
    save(root, 0, 1, 1, recycle=False)
    pauser.arm(root, [begun, when])
    writer = Writer(pauser, lambda: save(root, 1, 1, 2))
    story = []
    at = writer.next_pause()
    story.append(f"writer paused after {at}")
    assert at is not None, "the writer's step directory never appeared"
    rival = other.start(timeout=WAIT, cmd="save", root=str(root), step=1, wid=2, seq=1)
    story.append(f"rival save: {rival}")
    assert rival is not None and rival["event"] == "done" and "dir" in rival, rival
    writer.go_on()
    at = writer.next_pause()
    event = None
    if at is not None:
        story.append(f"writer paused after {at}")
        event = other.start(cmd="gc", root=str(root), pause=mode)
        story.append(f"collector: {event}")
    writer.join()
    pauser.disarm()
    if not isinstance(writer.error, zarrckpt.ConcurrentWriteError):
        story.append(f"writer's save 1 raised {writer.error!r} (expected ConcurrentWriteError)")
    if at is None:
        event = other.start(cmd="gc", root=str(root), pause=mode)
        story.append(f"collector (after the save): {event}")
    try:
        save(root, 2, 1, 3)
    except Exception as exc:
        story.append(f"writer's save 2 raised {exc!r}")
    done = other.finish() if (event is None or event["event"] != "done") else event
    story.append(f"collector done: {done.get('debris')} {done.get('error', '')}")
    return story


def test_losing_writer_between_lease_release_and_spare_with_collector(tmp_path, pauser, other):
    """A writer that lost the race (ConcurrentWriteError) has released its step directory's
    lease and not yet made it its spare; a collector deletes it meanwhile (rmtree under way)
    and the writer's next save recycles it."""
    ref = reference_files(tmp_path)
    root = tmp_path / "root"
    story = losing_save_with_collector(root, pauser, other, lease_released, "inside-delete")
    _check(root, ref, (2, 1, 3), story)
    forget_spare(root)


def test_gc_while_a_writer_holds_a_spare(tmp_path, pauser, other):
    """gc while this process is alive with a spare: nothing to delete (the spare is leased);
    the writer's next saves recycle it and are intact."""
    ref = reference_files(tmp_path)
    root = tmp_path / "root"
    save(root, 0, 1, 1)
    save(root, 1, 1, 2)  # drops step 0: the spare
    event = other.start(cmd="gc", root=str(root), pause="inside-delete")
    story = [f"collector: {event}"]
    save(root, 2, 1, 3)
    done = other.finish() if (event is None or event["event"] != "done") else event
    story.append(f"collector done: {done}")
    save(root, 3, 1, 4)
    _check(root, ref, (3, 1, 4), story)
    assert done["rc"] == 0 and done["debris"] == [], story
    forget_spare(root)


# --- every pause point ----------------------------------------------------------------------


def _trace_of(tmp_path: Path, pauser: Pauser, run: Callable[[Path], None]) -> list[Call]:
    """The writer's coordination calls in a run without pauses."""
    root = tmp_path / "trace"
    pauser.arm(root, [])
    run(root)
    trace = list(pauser.trace)
    pauser.disarm()
    forget_spare(root)
    return trace


@pytest.mark.parametrize("mode", ["inside-delete", None])
def test_every_pause_point_of_a_dropping_save(tmp_path, pauser, other, mode):
    """The writer's save of step 2 (dropping step 1) pauses after each of its coordination
    calls in turn; a collector runs meanwhile (to completion, or paused inside its deletion
    until the writer's next save is done)."""
    ref = reference_files(tmp_path)

    def plain(root: Path) -> None:
        save(root, 1, 1, 2, recycle=False)
        pauser.trace.clear()
        save(root, 2, 1, 3)

    trace = _trace_of(tmp_path, pauser, plain)
    assert trace, "no coordination calls seen"
    failures = []
    for k in range(len(trace)):
        root = tmp_path / f"k{k}"
        story = dropping_save_with_collector(root, pauser, other, lambda c, k=k: c.index == k, mode)
        problems = damage(root, ref, (3, 1, 4)) + [s for s in story if "raised" in s]
        if problems:
            failures.append(f"pause after {trace[k]}: {problems[:3]} | {story}")
    assert not failures, f"{len(failures)} of {len(trace)} pause points:\n" + "\n".join(failures)


@pytest.mark.parametrize("mode", ["inside-delete", None])
def test_every_pause_point_of_a_losing_save(tmp_path, pauser, other, mode):
    """As above for a save that loses the race: after its step directory appears, the other
    process commits the same step; then the losing save pauses after each of its later
    coordination calls in turn while a collector runs."""
    ref = reference_files(tmp_path)
    root = tmp_path / "trace"
    save(root, 0, 1, 1, recycle=False)
    pauser.arm(root, [begun])
    writer = Writer(pauser, lambda: save(root, 1, 1, 2))
    assert writer.next_pause() is not None
    start = len(pauser.trace)
    rival = other.start(timeout=WAIT, cmd="save", root=str(root), step=1, wid=2, seq=1)
    assert rival is not None and "dir" in rival, rival
    writer.join()
    assert isinstance(writer.error, zarrckpt.ConcurrentWriteError), writer.error
    trace = pauser.trace[start:]
    pauser.disarm()
    forget_spare(root)
    failures = []
    for k, call in enumerate(trace):
        root = tmp_path / f"k{k}"
        # the second predicate counts calls after the first pause
        seen = {"n": -1}

        def nth(c: Call, k=k, seen=seen) -> bool:
            seen["n"] += 1
            return seen["n"] == k

        story = losing_save_with_collector(root, pauser, other, nth, mode)
        problems = damage(root, ref, (2, 1, 3)) + [s for s in story if "raised" in s]
        if problems:
            failures.append(f"pause after {call}: {problems[:3]} | {story}")
    assert not failures, f"{len(failures)} of {len(trace)} pause points:\n" + "\n".join(failures)
