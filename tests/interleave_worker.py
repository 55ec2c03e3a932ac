"""A second process for tests/test_interleavings.py, driven by JSON lines on stdin.

Commands (one JSON object a line): ``{"cmd": "gc", "root": R, "pause": MODE}`` runs
``zarrckpt gc --json R`` (``zarrckpt.cli.main``) in a thread; ``{"cmd": "save", "root": R,
"step": S, "wid": W, "seq": Q}`` saves ``stress_worker.make_tree(S, W, Q, **SMALL)`` as step S
(overwrite=True, the defaults keep=1, recycle=True); ``{"cmd": "resume"}`` lets a paused command
go on; ``{"cmd": "quit"}``. Replies are JSON lines on stdout: ``{"event": "paused", ...}`` and
``{"event": "done", ...}``.

``pause`` stops the command once, *before* an os-level call, so the test can run another party
meanwhile: ``"first-delete"`` at the first of ``shutil.rmtree``, ``os.rename``, ``os.replace``,
``os.unlink``, ``os.remove``, ``os.rmdir`` (a collector that has judged something garbage and is
about to delete it); ``"inside-delete"`` at the first ``os.unlink``/``os.remove``/``os.rmdir``
(a deletion under way: ``rmtree`` has opened the directory and listed it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import threading
import traceback
import warnings

import stress_worker as sw

#: the small tree of the interleaving tests (a few leaves, ~25 files)
SMALL = {"big": 4096, "n_small": 4}
CHUNK_BYTES = 4096

_out_lock = threading.Lock()
_stdout = sys.stdout  # replies go here even while a command's output is captured
_resume = threading.Event()
_armed: dict | None = None
_arm_lock = threading.Lock()

_DELETES = {"unlink", "remove", "rmdir"}
_ALL = _DELETES | {"rename", "replace", "rmtree"}


def reply(**event) -> None:
    with _out_lock:
        _stdout.write(json.dumps(event) + "\n")
        _stdout.flush()


def _maybe_pause(name: str, args: tuple) -> None:
    global _armed
    with _arm_lock:
        arm = _armed
        if arm is None or name not in (_ALL if arm["mode"] == "first-delete" else _DELETES):
            return
        _armed = None  # once
    reply(event="paused", op=name, args=[str(a) for a in args][:2])
    if not _resume.wait(120):
        reply(event="error", msg="never resumed")


def _hook(module, name: str) -> None:
    original = getattr(module, name)

    def hooked(*args, **kwargs):
        _maybe_pause(name, args)
        return original(*args, **kwargs)

    setattr(module, name, hooked)


def gc(cmd: dict) -> None:
    from zarrckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["gc", "--json", cmd["root"]])
    debris = [i["name"] for i in json.loads(out.getvalue())["garbage"]] if rc == 0 else None
    reply(event="done", cmd="gc", rc=rc, debris=debris, err=err.getvalue()[-1000:])


def save(cmd: dict) -> None:
    import zarrckpt

    tree = sw.make_tree(cmd["step"], cmd["wid"], cmd["seq"], **SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            where = zarrckpt.save_pytree(
                cmd["root"],
                tree,
                step=cmd["step"],
                overwrite=True,
                verbose=False,
                chunk_bytes=CHUNK_BYTES,
            )
            result = {"dir": os.path.basename(where.rstrip("/"))}
        except zarrckpt.ConcurrentWriteError:
            result = {"lost": True}
    reply(event="done", cmd="save", warnings=[str(w.message) for w in caught], **result)


def _run(fn, cmd: dict) -> None:
    try:
        fn(cmd)
    except BaseException as exc:
        reply(
            event="done",
            cmd=cmd["cmd"],
            error=f"{type(exc).__name__}: {exc}",
            tb=traceback.format_exc()[-2000:],
        )


def main() -> None:
    global _armed
    import zarrckpt.cli  # noqa: F401 - imported before the first command

    for name in ("unlink", "remove", "rmdir", "rename", "replace"):
        _hook(os, name)  # in this process only (the tests import the constants above)
    _hook(shutil, "rmtree")
    reply(event="ready")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "resume":
            _resume.set()
            continue
        _resume.clear()
        with _arm_lock:
            _armed = {"mode": cmd["pause"]} if cmd.get("pause") else None
        fn = {"gc": gc, "save": save}[cmd["cmd"]]
        threading.Thread(target=_run, args=(fn, cmd), daemon=True).start()


if __name__ == "__main__":
    main()
