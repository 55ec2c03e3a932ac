import os

# Two CPU devices so that sharded JAX targets are exercised on any machine (set before jax loads).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import uuid

import fsspec
import pytest


@pytest.fixture(autouse=True)
def _isolate_fsspec():
    """fsspec caches filesystem instances and keeps memory:// in a class-level dict."""
    yield
    fsspec.filesystem("memory").store.clear()
    fsspec.filesystem("memory").pseudo_dirs[:] = [""]


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    """A fresh checkpoint root on each backend of the contract."""
    if request.param == "local":
        return str(tmp_path / "ckpt")
    return f"memory://{uuid.uuid4().hex}/ckpt"


@pytest.fixture
def local_url(tmp_path):
    return str(tmp_path / "ckpt")
