"""One process of a multi-process JAX job, for ``test_multihost`` and ``bench_multihost``.

    python multihost_worker.py SCENARIO PROCESS COUNT PORT ROOT OUT [ARG]

Starts ``jax.distributed`` on 127.0.0.1:PORT with CPU devices (``XLA_FLAGS`` from the
caller decides how many per process) and gloo collectives, runs SCENARIO against the
checkpoint root ROOT, and writes what happened to ``OUT/<PROCESS>.json``: the outcome
(``ok`` or the error's class and message), and the storage keys this process wrote and read
(the storage the save and load open is wrapped to record them: the real one does the work).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")

SCENARIO, PROCESS, COUNT, PORT, ROOT, OUT = sys.argv[1:7]
ARG = sys.argv[7] if len(sys.argv) > 7 else ""
PROCESS, COUNT = int(PROCESS), int(COUNT)
jax.distributed.initialize(
    f"127.0.0.1:{PORT}", num_processes=COUNT, process_id=PROCESS, heartbeat_timeout_seconds=10
)
jax.devices()  # every process starts its backend (a collective step) before the scenario

from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import zarrckpt  # noqa: E402
from zarrckpt import _read, _write  # noqa: E402

written: list[str] = []
read: list[str] = []


def _spy(open_storage: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        storage = open_storage(*args, **kwargs)
        put, put_batch, get, get_batch = (
            storage.put, storage.put_batch, storage.get, storage.get_batch
        )  # fmt: skip

        async def spy_put(key: str, parts: Any) -> None:
            written.append(key)
            await put(key, parts)

        async def spy_put_batch(items: Any) -> None:
            written.extend(key for key, _ in items)
            await put_batch(items)

        async def spy_get(key: str, limit: int | None = None) -> Any:
            read.append(key)
            return await get(key, limit)

        async def spy_get_batch(items: Any, limit: int | None = None) -> None:
            read.extend(key for key, _ in items)
            await get_batch(items, limit)

        storage.put, storage.put_batch = spy_put, spy_put_batch
        storage.get, storage.get_batch = spy_get, spy_get_batch
        if storage.reads_into:
            read_into = storage.read_into

            def spy_read_into(key: str, buffers: Any) -> Any:
                read.append(key)
                return read_into(key, buffers)

            storage.read_into = spy_read_into
        return storage

    return wrapped


_write.open_storage = _spy(_write.open_storage)
_read.open_storage = _spy(_read.open_storage)


def expected(
    name: str, shape: tuple[int, ...], dtype: str = "float32", step: int = 0
) -> np.ndarray:
    """The value every scenario gives leaf ``name`` at ``step`` (the test recomputes it)."""
    seed = sum(map(ord, name)) + 1000 * step
    return (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + seed).astype(dtype)


SHAPES = {"w": (64, 48), "v": (12, 48), "r": (12,), "b": (12, 8)}  # as in test_multihost
OPTIONS = json.loads(os.environ.get("MULTIHOST_STORAGE_OPTIONS", "null"))


def mesh_2d() -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(2, -1), ("a", "b"))


def mesh_1d() -> Mesh:
    return Mesh(np.array(jax.devices()), ("x",))


def specs(layout: str) -> dict[str, P]:
    if layout == "2d":  # the save's: both axes split, a trailing-axis split, replicas
        return {"w": P("a", "b"), "v": P(None, "b"), "r": P(), "b": P("b", "a")}
    return {"w": P(None, "x"), "v": P("x"), "r": P("x"), "b": P("x", None)}  # the restore's


def global_tree(step: int = 0, layout: str = "2d") -> dict[str, Any]:
    mesh = mesh_2d() if layout == "2d" else mesh_1d()
    tree: dict[str, Any] = {}
    for name, spec in specs(layout).items():
        value = expected(name, SHAPES[name], step=step)
        sharding = NamedSharding(mesh, spec)
        tree[name] = jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])
    tree["meta"] = {"epoch": step, "note": "every process saves the same tree"}
    return tree


def targets(layout: str) -> dict[str, Any]:
    mesh = mesh_2d() if layout == "2d" else mesh_1d()
    tree: dict[str, Any] = {
        name: jax.ShapeDtypeStruct(SHAPES[name], np.float32, sharding=NamedSharding(mesh, spec))
        for name, spec in specs(layout).items()
    }
    tree["meta"] = {"epoch": 0, "note": ""}
    return tree


def check_shards(tree: dict[str, Any], step: int) -> None:
    """Every addressable shard of every restored leaf holds the expected values."""
    for name in SHAPES:
        array = tree[name]
        want = expected(name, SHAPES[name], step=step)
        assert array.shape == want.shape, (name, array.shape)
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], name)


def run() -> dict[str, Any]:
    step = int(ARG) if ARG.isdigit() else 0
    save = {"verbose": False, "chunk_bytes": 1024, "storage_options": OPTIONS}
    if SCENARIO == "save":
        zarrckpt.save_pytree(ROOT, global_tree(step), step=step, **save)
    elif SCENARIO == "async":
        manager = zarrckpt.AsyncManager()
        for s in (step, step + 1, step + 2):  # the third rewrites the first's directory
            zarrckpt.save_pytree(ROOT, global_tree(s), async_manager=manager, step=s, **save)
        manager.wait_previous_save()
    elif SCENARIO == "restore":
        tree = zarrckpt.load_pytree(ROOT, targets("1d"), storage_options=OPTIONS)
        check_shards(tree, step=0)
    elif SCENARIO == "fail":  # process 1 fails while writing
        if PROCESS == 1:
            from zarrckpt import _engine

            async def broken(*args: Any, **kwargs: Any) -> None:
                raise OSError("disk on fire")

            _write.write_step = broken
        zarrckpt.save_pytree(ROOT, global_tree(step), step=step, **save)
    elif SCENARIO == "mismatch":  # process 1 saves another tree
        tree = global_tree(step)
        if PROCESS == 1:
            tree["extra"] = np.zeros(3)
        zarrckpt.save_pytree(ROOT, tree, step=step, **save)
    elif SCENARIO == "absent":  # process 1 never calls save
        if PROCESS != 1:
            zarrckpt.save_pytree(ROOT, global_tree(step), step=step, **save)
        else:
            time.sleep(float(os.environ["ZARRCKPT_COLLECTIVE_TIMEOUT_S"]) + 5)
    elif SCENARIO == "kill":  # process 1 dies mid-save, after writing some chunks
        if PROCESS == 1:
            from zarrckpt import _engine

            real = _engine.write_step

            async def dying(storage: Any, *args: Any, **kwargs: Any) -> None:
                put = storage.put

                async def put_then_die(key: str, parts: Any) -> None:
                    await put(key, parts)
                    if len(written) > 3:
                        os.kill(os.getpid(), 9)

                put_batch = storage.put_batch

                async def put_batch_then_die(items: Any) -> None:
                    await put_batch(items)
                    os.kill(os.getpid(), 9)

                storage.put, storage.put_batch = put_then_die, put_batch_then_die
                await real(storage, *args, **kwargs)

            _write.write_step = dying
        zarrckpt.save_pytree(ROOT, global_tree(step), step=step, **save)
    elif SCENARIO == "late0":  # process 0 arrives after the others gave up waiting
        if PROCESS == 0:
            time.sleep(3)
        zarrckpt.save_pytree(ROOT, global_tree(step), step=step, **save)
    elif SCENARIO == "desync":  # one process fails its first save alone; the next ones pair up
        outcomes = []
        for s in range(3):
            tree = global_tree(s)
            if s == 0 and PROCESS == 1:
                tree["bad"] = object()
            try:
                zarrckpt.save_pytree(ROOT, tree, step=s, **save)
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        return {"outcomes": outcomes}
    elif SCENARIO == "diffroot":  # process 1 names another root
        root = ROOT if PROCESS == 0 else ROOT + "-elsewhere"
        zarrckpt.save_pytree(root, global_tree(step), step=step, **save)
    elif SCENARIO == "local":  # process-local trees: each process saves alone, to its own root
        zarrckpt.save_pytree(f"{ROOT}/proc{PROCESS}", {"p": np.full(3, PROCESS)}, **save)
        if PROCESS == 0:  # the usual "process 0 saves" pattern
            zarrckpt.save_pytree(f"{ROOT}/only0", {"p": np.arange(3)}, **save)
    elif SCENARIO == "overlap":  # a background save to one root while the foreground saves
        manager = zarrckpt.AsyncManager()
        for s in range(3):
            zarrckpt.save_pytree(f"{ROOT}/a", global_tree(s), async_manager=manager, **save)
            zarrckpt.save_pytree(f"{ROOT}/b", global_tree(s), **save)
        manager.wait_previous_save()
        zarrckpt.save_pytree(f"{ROOT}/b", global_tree(3), **save)  # collects older keys
        from jax._src import distributed

        client = distributed.global_state.client
        return {"keys": len(client.key_value_dir_get("zarrckpt/save/"))}
    elif SCENARIO == "partial":  # a leaf on process 1's devices only, beside global ones
        tree = global_tree(step)
        mine = [d for d in jax.devices() if d.process_index == 1]
        tree["p1only"] = jax.make_array_from_callback(
            (4,),
            NamedSharding(Mesh(np.array(mine), ("y",)), P("y")),
            lambda i: np.ones(4, np.float32)[i],
            dtype=np.float32,  # process 0 holds no shard to tell it
        )
        zarrckpt.save_pytree(ROOT, tree, step=step, **save)
    elif SCENARIO == "nolocal":  # a target with no shard on process 0: still a global array
        mine = [d for d in jax.devices() if d.process_index == 1]
        sharding = NamedSharding(Mesh(np.array(mine), ("y",)), P("y"))
        target = {
            **targets("1d"),
            "w": jax.ShapeDtypeStruct(SHAPES["w"], np.float32, sharding=sharding),
        }
        tree = zarrckpt.load_pytree(ROOT, target, storage_options=OPTIONS)
        assert len(tree["w"].addressable_shards) == (2 if PROCESS == 1 else 0)
        for shard in tree["w"].addressable_shards:
            np.testing.assert_array_equal(
                np.asarray(shard.data), expected("w", SHAPES["w"])[shard.index]
            )
    elif SCENARIO == "keytarget":  # a PRNG key sharded over processes: a clear refusal
        sharding = NamedSharding(mesh_1d(), P("x"))
        keys = jax.random.split(jax.random.key(0), 4)  # the same local value on every process
        zarrckpt.save_pytree(ROOT, {**global_tree(0), "key": keys}, **save)
        target = {
            **targets("1d"),
            "key": jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding),
        }
        zarrckpt.load_pytree(ROOT, target, storage_options=OPTIONS)
    elif SCENARIO == "loaddrift":  # process 1's first load fails before reading anything
        outcomes = []
        for attempt in range(2):
            bad = attempt == 0 and PROCESS == 1
            try:
                tree = zarrckpt.load_pytree(
                    ROOT, targets("1d"), storage_options=OPTIONS, mismatch="bad" if bad else "error"
                )
                check_shards(tree, step=0)
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        return {"outcomes": outcomes}
    elif SCENARIO == "statetree":  # a brainstate State holding a sub-tree of global arrays
        import brainstate

        tree = global_tree(step)
        zarrckpt.save_pytree(ROOT, {"s": brainstate.ParamState({"w": tree["w"]})}, **save)
    elif SCENARIO == "overwrite":  # overwrite=False on a committed step: refused everywhere
        zarrckpt.save_pytree(ROOT, global_tree(step), overwrite=False, step=step, **save)
    else:
        raise SystemExit(f"unknown scenario {SCENARIO}")
    return {}


def main() -> None:
    try:
        result = {"outcome": "ok", **run()}
    except Exception as exc:
        result = {
            "outcome": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
    result.update(written=written, read=read, process=PROCESS)
    with open(os.path.join(OUT, f"{PROCESS}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    # Process 0 hosts the coordination service: leaving before the others have finished
    # would end them. Then skip jax.distributed's own shutdown, which fails the whole job if
    # any process failed.
    from jax._src import distributed

    try:
        distributed.global_state.client.wait_at_barrier("worker-exit", 60_000)
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
