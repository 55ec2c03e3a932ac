"""The process around a save: fork, Ctrl-C, and the memory a save may take."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import zarrckpt
import zarrckpt._write as write
from zarrckpt._commit import read_manifest
from zarrckpt._storage import open_storage
from zarrckpt._sync import run

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
ROOT_FILES = {"zarr.json", ".zarrckpt.lock"}


def child_env() -> dict:
    """Subprocesses import this checkout's zarrckpt, whatever is installed."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def root_entries(url) -> set[str]:
    """Everything directly under the root except the manifest, the lock file and the one
    spare that local recycling may keep (the saving process's own, never more)."""
    names = set(run(open_storage(url).list_dir(""))) - ROOT_FILES
    spares = {n for n in names if n.startswith(".spare-")}
    assert len(spares) <= 1, f"more than one spare: {spares}"
    return names - spares


def committed_dirs(url) -> set[str]:
    manifest = run(read_manifest(open_storage(url)))
    return manifest.dirs if manifest else set()


# --- fork ----------------------------------------------------------------------------------


def _forked_child(root: str) -> None:
    zarrckpt.save_pytree(root, {"who": "child", "w": np.arange(1000)}, verbose=False)
    tree = zarrckpt.load_pytree(root)
    assert tree["who"] == "child" and tree["w"].tolist() == list(range(1000))


def _fork_and_join(root: str) -> int | None:
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_forked_child, args=(root,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        child.join()
        return None
    return child.exitcode


@pytest.fixture
def warm(tmp_path):
    """zarrckpt's loop thread and both thread pools exist in this process."""
    root = str(tmp_path / "parent")
    zarrckpt.save_pytree(root, {"w": np.arange(10_000)}, verbose=False)
    assert zarrckpt.load_pytree(root)["w"].sum() == sum(range(10_000))
    return root


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*fork.*:RuntimeWarning")
def test_a_forked_child_can_save_and_load(warm, tmp_path):
    root = str(tmp_path / "child")
    exitcode = _fork_and_join(root)
    assert exitcode is not None, "the forked child hung in zarrckpt"
    assert exitcode == 0
    assert zarrckpt.load_pytree(root)["who"] == "child"
    assert zarrckpt.load_pytree(warm)["w"].size == 10_000  # the parent still works


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*fork.*:RuntimeWarning")
def test_fork_while_a_background_save_is_in_flight(warm, tmp_path, monkeypatch):
    """The parent's loop is busy with a save (its locks may be held) when the child forks."""
    parent, original = os.getpid(), write.write_step
    writing, release = threading.Event(), threading.Event()

    async def paused(*args, **kwargs):
        if os.getpid() == parent:
            import asyncio

            writing.set()
            deadline = time.monotonic() + 60
            while not release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        return await original(*args, **kwargs)

    monkeypatch.setattr(write, "write_step", paused)
    with zarrckpt.AsyncManager() as manager:
        zarrckpt.save_pytree(warm, {"w": np.ones(7)}, async_manager=manager, verbose=False)
        assert writing.wait(30)
        try:
            exitcode = _fork_and_join(str(tmp_path / "child"))
        finally:
            release.set()
    assert exitcode is not None, "the forked child hung in zarrckpt"
    assert exitcode == 0
    assert zarrckpt.load_pytree(str(tmp_path / "child"))["who"] == "child"
    assert zarrckpt.load_pytree(warm)["w"].tolist() == [1.0] * 7


# --- Ctrl-C --------------------------------------------------------------------------------


def ctrl_c_child(script: str) -> list[str]:
    """The command that runs ``script`` in a Python that Ctrl-C interrupts, as at a terminal:
    a test run started in the background by a non-interactive shell (``pytest &``, ``nohup``)
    has SIGINT ignored, which its children inherit and Python then keeps."""
    reset = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    return [sys.executable, "-c", reset + script]


GIB = 1024 * MIB
SAVER = textwrap.dedent(
    """
    import sys, time, numpy as np, zarrckpt
    root, nbytes, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    big = np.arange(nbytes // 4, dtype=np.float32)
    zarrckpt.save_pytree(root, {"big": big[:16]}, step=0, verbose=False)
    print("saving", flush=True)
    try:
        zarrckpt.save_pytree(root, {"big": big}, step=1, chunk_bytes=8 << 20, verbose=False)
        print("saved", flush=True)
    except KeyboardInterrupt:
        if mode == "exit":
            raise
        # Like Jupyter: the process lives on after the interrupt, zarrckpt's loop with it.
        print("interrupted", flush=True)
        # Let anything still running on zarrckpt's loop (an abandoned save would) finish.
        import asyncio
        from zarrckpt import _sync

        async def others():
            return len(asyncio.all_tasks()) - 1

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not asyncio.run_coroutine_threadsafe(others(), _sync._loop).result():
                break
            time.sleep(0.05)
        time.sleep(1)
        print("steps", zarrckpt.list_steps(root), flush=True)
    """
)


def _chunks_written(root: Path) -> int:
    return sum(
        len(files) for step in root.glob("step_0000000001.*") for _, _, files in os.walk(step)
    )


@pytest.mark.parametrize("mode", ["exit", "survive"])
def test_ctrl_c_during_a_large_save(mode, tmp_path):
    root = tmp_path / "ckpt"
    child = subprocess.Popen(
        [*ctrl_c_child(SAVER), str(root), str(GIB), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 60
        while _chunks_written(root) < 12:  # a dozen 8 MiB chunks of 128: well inside the save
            assert child.poll() is None and time.monotonic() < deadline, "the save never started"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGINT)
        interrupted = time.monotonic()
        if mode == "survive":
            line = child.stdout.readline().strip()  # the save call has returned by then
            took = time.monotonic() - interrupted
            assert line == "interrupted", "the save finished before the interrupt"
            assert took < 10, f"the interrupted save returned {took:.1f} s after Ctrl-C"
            # The process and its zarrckpt loop live on: nothing may publish later.
            for _ in range(4):
                assert zarrckpt.list_steps(str(root)) == [0]
                time.sleep(0.5)
        try:
            out, err = child.communicate(timeout=10 if mode == "exit" else 70)
        except subprocess.TimeoutExpired:
            pytest.fail("the interrupted process did not exit within 10 s of Ctrl-C")
        if mode == "exit":
            took = time.monotonic() - interrupted
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert "saved" not in out, "the save finished before the interrupt: the test proved nothing"
    if mode == "exit":
        assert "KeyboardInterrupt" in err, err[-2000:]
        assert child.returncode != 0
    else:
        assert child.returncode == 0, err[-2000:]
        assert "steps [0]" in out
    print(f"save interrupted {took:.2f} s after SIGINT")

    # Nothing was committed, and nothing is committed later by a leftover thread or process.
    assert zarrckpt.list_steps(str(root)) == [0]
    time.sleep(2)
    assert zarrckpt.list_steps(str(root)) == [0]
    assert zarrckpt.load_pytree(str(root))["big"].tolist() == list(range(16))
    assert root_entries(str(root)) - committed_dirs(str(root)), "no debris: was it mid-save?"

    # The next save collects the interrupted step's directory.
    zarrckpt.save_pytree(str(root), {"big": np.ones(3)}, step=1, verbose=False)
    assert zarrckpt.list_steps(str(root)) == [1]
    assert root_entries(str(root)) == committed_dirs(str(root))
    assert not list(root.glob("*.partial")) and not list(root.glob(".tmp-*"))


# --- memory --------------------------------------------------------------------------------

PEAK = textwrap.dedent(
    """
    import re, sys, numpy as np, zarrckpt

    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\\s+(\\d+) kB", f.read(), re.M).group(1)) * 1024

    root = sys.argv[1]
    # Warm up: imports, thread pools and the code paths of a Fortran-order save.
    zarrckpt.save_pytree(root + "-warm", {"a": np.ones((64, 32), np.float32, order="F")},
                         verbose=False)
    a = np.empty((16384, 8192), dtype=np.float32, order="F")  # 512 MiB
    a[...] = np.arange(8192, dtype=np.float32)  # touch every page
    assert not a.flags.c_contiguous
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = status("VmRSS")
    zarrckpt.save_pytree(root, {"a": a}, verbose=False)
    print(status("VmHWM") - before, flush=True)
    ckpt = zarrckpt.open_checkpoint(root)
    assert np.array_equal(ckpt["a"][::4096, :], a[::4096, :])
    assert np.array_equal(ckpt["a"][:, 8191], a[:, 8191])
    """
)


def test_saving_a_large_fortran_array_takes_little_extra_memory(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the RSS high-water mark")
    root = tmp_path / "ckpt"
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(root)],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    extra = int(done.stdout.split()[0]) / MIB
    print(f"peak extra RSS while saving 512 MiB (Fortran order): {extra:.0f} MiB")
    assert extra < 160, f"saving took {extra:.0f} MiB on top of the array"


PUBLISH_INTERRUPTED = textwrap.dedent(
    """
    import sys, time, numpy as np, zarrckpt
    from zarrckpt._storage.local import LocalStorage
    root = sys.argv[1]
    zarrckpt.save_pytree(root, {"v": np.zeros(3)}, step=0, verbose=False)
    original = LocalStorage._put_if_unchanged

    def slow_publish(self, *args):  # in zarrckpt's I/O thread, as a real fsync can be slow
        print("publishing", flush=True)
        time.sleep(1.0)
        return original(self, *args)

    LocalStorage._put_if_unchanged = slow_publish
    try:
        zarrckpt.save_pytree(root, {"v": np.ones(3)}, step=1, verbose=False)
        print("saved", flush=True)
    except KeyboardInterrupt:
        at_interrupt = zarrckpt.list_steps(root)
        time.sleep(2)
        print("steps", at_interrupt, zarrckpt.list_steps(root), flush=True)
    """
)


def test_ctrl_c_during_the_publish_never_commits_afterwards(tmp_path):
    """Interrupted while the manifest is being replaced in a thread: the commit either happens
    before the caller sees KeyboardInterrupt or not at all, never after (it once did)."""
    root = tmp_path / "ckpt"
    child = subprocess.Popen(
        [*ctrl_c_child(PUBLISH_INTERRUPTED), str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "publishing"
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err[-2000:]
    line = out.strip().splitlines()[-1]
    assert line.startswith("steps "), out
    at_interrupt, later = line[len("steps ") :].split("] [")
    assert at_interrupt + "]" == "[" + later, f"committed after the interrupt: {line}"
    steps = zarrckpt.list_steps(str(root))
    assert steps in ([0], [0, 1], [1])
    assert zarrckpt.load_pytree(str(root))["v"].tolist() == ([1.0] * 3 if 1 in steps else [0.0] * 3)


SIGNAL_TO_A_WORKER = textwrap.dedent(
    """
    import os, signal, sys, threading, time, numpy as np, zarrckpt
    root = sys.argv[1]
    big = np.arange(256 * 2**20, dtype=np.float32)  # 1 GiB in 8 MiB chunks: seconds of work
    zarrckpt.save_pytree(root, {"big": big[:16]}, step=0, verbose=False)

    def interrupt_a_worker():
        while not any(os.scandir(root)) or len(os.listdir(root)) < 3:
            time.sleep(0.01)
        time.sleep(0.3)  # well inside the save
        worker = next(t for t in threading.enumerate() if t.name.startswith("zarrckpt-io"))
        signal.pthread_kill(worker.ident, signal.SIGINT)  # the kernel's choice, forced
        print("sent", flush=True)

    threading.Thread(target=interrupt_a_worker, daemon=True).start()
    start = time.monotonic()
    try:
        zarrckpt.save_pytree(root, {"big": big}, step=1, chunk_bytes=8 << 20, verbose=False)
        print("saved", flush=True)
    except KeyboardInterrupt:
        print("interrupted", zarrckpt.list_steps(root), flush=True)
    """
)


def test_ctrl_c_delivered_to_a_worker_thread_still_interrupts(tmp_path):
    """A process-directed SIGINT may land on any thread; the blocked caller must still see
    it promptly (it used to wait for the whole save, which then committed)."""
    root = tmp_path / "ckpt"
    out = subprocess.run(
        [*ctrl_c_child(SIGNAL_TO_A_WORKER), str(root)],
        capture_output=True, text=True, env=child_env(), timeout=120,
    ).stdout  # fmt: skip
    assert "sent" in out and "saved" not in out, out
    assert "interrupted [0]" in out, out
    assert zarrckpt.list_steps(str(root)) == [0]
