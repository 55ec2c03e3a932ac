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

# Two CPU devices so that sharded JAX targets are exercised on any machine (set before jax loads).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import uuid  # noqa: E402

import fsspec  # noqa: E402
import pytest  # noqa: E402
from servers import gcs_options, s3_options, start_gcs, start_s3, stop  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (moto[server]) on 127.0.0.1."""
    log = str(tmp_path_factory.mktemp("moto") / "moto.log")
    proc, url, fh = start_s3(log)
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
    fsspec.config.conf["gcs"] = fsspec.config.conf["gs"] = gcs_options(url)
    yield url
    fsspec.config.conf.pop("gcs", None)
    fsspec.config.conf.pop("gs", None)
    stop(proc, fh)


def _fresh_bucket(protocol: str, options: dict) -> tuple[str, dict]:
    """A new bucket (names are unique per test): ``(root URL, storage_options)``."""
    bucket = "t-" + uuid.uuid4().hex[:12]
    fsspec.filesystem(protocol, skip_instance_cache=True, **options).mkdir(bucket)
    return f"{protocol}://{bucket}/run", options


@pytest.fixture
def s3_root(s3_server):
    return _fresh_bucket("s3", s3_options(s3_server))


@pytest.fixture
def gcs_root(gcs_server):
    return _fresh_bucket("gs", gcs_options(gcs_server))


@pytest.fixture(autouse=True)
def _isolate_fsspec():
    """fsspec caches filesystem instances and keeps memory:// in a class-level dict."""
    yield
    fsspec.filesystem("memory").store.clear()
    fsspec.filesystem("memory").pseudo_dirs[:] = [""]


BACKENDS = ["local", "memory", "s3", "gcs"]


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
    root, options = request.getfixturevalue(f"{backend}_root")
    out = Root(root)
    out.storage_options = options
    return out


@pytest.fixture
def local_url(tmp_path):
    return str(tmp_path / "ckpt")
