import os

# Emulators on loopback: no real credentials, no metadata-server probes, no gRPC bucket-type
# lookups (gcsfs would hang ~60 s per call against an emulator). Set before gcsfs/botocore load.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)  # fmt: skip
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_var, None)
# The "s3" and "gcs" backends of the contract suite (and every test written for them) mean s3fs
# and gcsfs; "s3-obstore", "gcs-obstore" and "azure" choose obstore. Without this variable a
# user gets obstore wherever it is installed (tests/test_obstore.py checks that default).
os.environ["ZARRCKPT_STORAGE_BACKEND"] = "fsspec"

# Two CPU devices so that sharded JAX targets are exercised on any machine (set before jax loads).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import uuid  # noqa: E402

import fsspec  # noqa: E402
import pytest  # noqa: E402
from servers import (  # noqa: E402
    azure_create_container,
    azure_options,
    azurite_command,
    gcs_options,
    s3_options,
    start_azurite,
    start_gcs,
    start_s3,
    stop,
)


class ServerURL(str):
    """A server's base URL; ``.log`` is the file its request log goes to."""

    log: str = ""


def _server_url(url: str, log: str) -> ServerURL:
    out = ServerURL(url)
    out.log = log
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (moto[server]) on 127.0.0.1; it logs one line per request."""
    log = str(tmp_path_factory.mktemp("moto") / "moto.log")
    proc, url, fh = start_s3(log)
    url = _server_url(url, log)
    # Defaults for every s3:// URL the tests open, as a user's fsspec config would give them.
    fsspec.config.conf["s3"] = s3_options(url)
    yield url
    fsspec.config.conf.pop("s3", None)
    stop(proc, fh)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1, with a listen backlog big enough for our concurrency."""
    log = str(tmp_path_factory.mktemp("gcs") / "gcs.log")
    proc, url, fh = start_gcs(log)
    url = _server_url(url, log)
    fsspec.config.conf["gcs"] = fsspec.config.conf["gs"] = gcs_options(url)
    yield url
    fsspec.config.conf.pop("gcs", None)
    fsspec.config.conf.pop("gs", None)
    stop(proc, fh)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory):
    """Azurite's blob service on 127.0.0.1 (telemetry off). Skipped where Azurite is not
    installed, except in CI (``CI=true``), whose .ci/run installs it."""
    if azurite_command() is None:
        message = "Azurite not installed: npm install --prefix build/azurite azurite"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    base = tmp_path_factory.mktemp("azurite")
    proc, url, fh = start_azurite(str(base / "azurite.log"), str(base / "data"))
    fsspec.config.conf["az"] = fsspec.config.conf["abfs"] = azure_options(url)
    yield url
    fsspec.config.conf.pop("az", None)
    fsspec.config.conf.pop("abfs", None)
    stop(proc, fh)


def _fresh_bucket(protocol: str, options: dict) -> tuple[str, dict]:
    """A new bucket (names are unique per test): ``(root URL, storage_options)``."""
    bucket = "t-" + uuid.uuid4().hex[:12]
    _bucket_maker(protocol, tuple(sorted(options.items()))).mkdir(bucket)
    return f"{protocol}://{bucket}/run", options


@functools.cache
def _bucket_maker(protocol: str, options: tuple) -> fsspec.AbstractFileSystem:
    """One filesystem per server for creating buckets (a new s3fs client costs ~0.5 s)."""
    return fsspec.filesystem(protocol, skip_instance_cache=True, **dict(options))


@pytest.fixture
def s3_root(s3_server):
    return _fresh_bucket("s3", s3_options(s3_server))


@pytest.fixture
def gcs_root(gcs_server):
    return _fresh_bucket("gs", gcs_options(gcs_server))


@pytest.fixture
def s3_obstore_root(s3_root, monkeypatch):
    """An S3 root served by obstore (options and ZARRCKPT_STORAGE_BACKEND say so)."""
    monkeypatch.setenv("ZARRCKPT_STORAGE_BACKEND", "obstore")
    url, options = s3_root
    return url, {**options, "backend": "obstore"}


@pytest.fixture
def gcs_obstore_root(gcs_root, monkeypatch):
    monkeypatch.setenv("ZARRCKPT_STORAGE_BACKEND", "obstore")
    url, options = gcs_root
    return url, {**options, "backend": "obstore"}


@pytest.fixture
def azure_root(azure_server, monkeypatch):
    """A fresh container on Azurite (obstore: zarrckpt has no adlfs path in the tests)."""
    monkeypatch.setenv("ZARRCKPT_STORAGE_BACKEND", "obstore")
    container = "t-" + uuid.uuid4().hex[:12]
    azure_create_container(azure_server, container)
    return f"az://{container}/run", {**azure_options(azure_server), "backend": "obstore"}


@pytest.fixture(autouse=True)
def _isolate_fsspec():
    """fsspec caches filesystem instances and keeps memory:// in a class-level dict."""
    yield
    fsspec.filesystem("memory").store.clear()
    fsspec.filesystem("memory").pseudo_dirs[:] = [""]


BACKENDS = ["local", "memory", "s3", "gcs", "s3-obstore", "gcs-obstore", "azure"]


class Root(str):
    """A checkpoint URL that remembers its storage_options (the contract suite's ``url``)."""

    storage_options: dict | None = None


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def url(backend, request, tmp_path):
    """A fresh checkpoint root on each backend of the contract suite."""
    if backend == "local":
        return Root(tmp_path / "ckpt")
    if backend == "memory":
        return Root(f"memory://{uuid.uuid4().hex}/ckpt")
    root, options = request.getfixturevalue(f"{backend.replace('-', '_')}_root")
    out = Root(root)
    out.storage_options = options
    return out


@pytest.fixture
def local_url(tmp_path):
    return str(tmp_path / "ckpt")


#: The obstore backends run the encoding-only parametrizations (every dtype, every codec) on a
#: sample: the bytes are the same whichever client carries them, and the "s3"/"gcs" backends
#: run them all. Keeps the suite's time in check (each remote test costs ~0.2 s).
_SAMPLED = {
    "test_every_dtype": {"bool", "float64", "complex128", "bfloat16", "float4_e2m1fn", "int4"},
    "test_chunked_arrays_across_codecs": {"None", "zstd"},
}
_OBSTORE_BACKENDS = ("s3-obstore-", "gcs-obstore-", "azure-")


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        sample = _SAMPLED.get(getattr(item, "originalname", ""))
        param = item.callspec.id if hasattr(item, "callspec") else ""
        if sample is not None and param.startswith(_OBSTORE_BACKENDS):
            (keep if param.rsplit("-", 1)[-1] in sample else drop).append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
