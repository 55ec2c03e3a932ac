"""End-to-end demo: train a small BrainPy SNN, checkpoint several steps, restore them.

Run ``python -m zarrckpt.demo [DIRECTORY]`` (default ``./demo-checkpoint``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="demo-checkpoint")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        import brainpy as bp
        import brainpy.math as bm
    except ImportError:
        print("the demo needs BrainPy: pip install 'zarrckpt[brainpy]'", file=sys.stderr)
        return 1

    import zarrckpt

    bm.set_platform("cpu")

    class SNN(bp.DynamicalSystem):  # the network of BrainPy's "Saving and Loading" tutorial
        def __init__(self, tau: float) -> None:
            super().__init__()
            self.l1 = bp.dnn.Dense(28 * 28, 10, b_initializer=None)
            self.l2 = bp.dyn.Lif(
                10, V_rest=0.0, V_reset=0.0, V_th=1.0, tau=tau, spk_fun=bm.surrogate.arctan
            )

        def update(self, x: Any) -> Any:
            return x >> self.l1 >> self.l2

    root = os.path.join(os.path.abspath(args.directory), "training")
    modules = os.path.join(os.path.abspath(args.directory), "module")
    print(f"checkpoint root: {root}")
    with bm.training_environment():
        net = SNN(2.0)
    opt = bp.optim.Adam(lr=1e-2, train_vars=net.train_vars().unique())
    rng = np.random.default_rng(0)
    x = bm.asarray(rng.random((8, 28 * 28), dtype=np.float32))
    target = bm.asarray(rng.random((8, 10), dtype=np.float32) < 0.2).astype(bm.float32)

    def loss() -> Any:
        net.reset_state(8)
        return bm.mean((net(x) - target) ** 2) + 1e-3 * bm.sum(net.l1.W**2)

    grad: Callable[[], Any] = bm.grad(loss, grad_vars=net.train_vars().unique(), return_value=True)
    for epoch_i in range(args.epochs):
        grads, value = grad()
        opt.update(grads)
        states = {"net": net.state_dict(), "optimizer": opt.state_dict(),
                  "epoch_i": epoch_i, "train_loss": float(value)}  # fmt: skip
        zarrckpt.save_pytree(root, states, step=epoch_i, keep=None, verbose=True)

    print(f"committed steps: {zarrckpt.list_steps(root)}")
    state = zarrckpt.load_pytree(root)
    result = net.load_state_dict(state["net"])
    print(
        f"net.load_state_dict -> missing {result.missing_keys}, unexpected {result.unexpected_keys}"
    )
    print(
        f"latest step {zarrckpt.latest_step(root)}: epoch {state['epoch_i']}, loss {state['train_loss']:.5f}"
    )

    # A second instance cannot load the first's state_dict (SNN1 != SNN0), but relative paths work.
    start = time.perf_counter()
    zarrckpt.save_module(net, modules, verbose=False)
    with bm.training_environment():
        other = SNN(2.0)
    other.reset_state(8)  # same batch size as the saved potentials
    result = zarrckpt.load_module(other, modules)
    same = all(
        np.array_equal(np.asarray(a.value), np.asarray(b.value))
        for a, b in zip(
            net.vars(method="relative").unique().values(),
            other.vars(method="relative").unique().values(),
            strict=True,
        )
    )
    print(f"load_module into a second instance: {result}, identical values: {same} "
          f"({time.perf_counter() - start:.2f} s)")  # fmt: skip
    return 0 if same and not result.missing_keys else 1


if __name__ == "__main__":
    raise SystemExit(main())
