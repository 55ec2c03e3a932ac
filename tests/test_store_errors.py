"""Store failures a person can act on: one short line naming the URL, the endpoint and the
cause, as a ``ZarrCkptError`` subclass, with the client's own error kept on ``__cause__``.

Every server here is on 127.0.0.1; the instance-metadata probe of the credentials tests goes to
a loopback server (configured explicitly, so it cannot leave the machine), or is switched off.
"""

import asyncio
import http.server
import os
import re
import socket
import sys
import threading
from typing import ClassVar

import numpy as np
import pytest
from servers import serve, stop

import zarrckpt
import zarrckpt._storage.obstore as ob
from zarrckpt import (
    StoreConnectionError,
    StoreCredentialsError,
    StoreError,
    UnknownProtocolError,
    ZarrCkptError,
)
from zarrckpt._storage import open_storage

#: where zarrckpt says the clients look for AWS credentials
LOOKED_IN = "(looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raised(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(ZarrCkptError) as info:
        fn(*args, **kwargs)
    return info.value


def check_message(exc: BaseException, kind: type, *parts: str, limit: int = 300) -> str:
    """The pinned shape of every such message: the subclass, one line, short, the parts."""
    text = str(exc)
    assert type(exc) is kind, (type(exc), text)
    assert isinstance(exc, ZarrCkptError) and isinstance(exc, StoreError | UnknownProtocolError)
    assert "\n" not in text and len(text) < limit, text
    prefix = text.split(" failed: ", 1)[0]
    assert len(prefix) < 200, text  # what comes before the cause
    for part in parts:
        assert part in text, (part, text)
    assert exc.__cause__ is not None  # the client's own error, whole
    return text


def save(url: str, options: dict) -> None:
    zarrckpt.save_pytree(url, {"w": np.ones(3)}, storage_options=options, verbose=False)


# --- a refused endpoint ---------------------------------------------------------------------


@pytest.fixture
def short_obstore_retries(monkeypatch):
    """obstore retries GCS requests twice (for S3, ``config_kwargs`` say so: see below)."""
    original = ob.gcs_config

    def short(options):
        config, client, _ = original(options)
        return config, {**client, "connect_timeout": "2s"}, {"max_retries": 2}

    monkeypatch.setattr(ob, "gcs_config", short)


@pytest.mark.parametrize(
    "protocol, options",
    [
        ("s3", {"key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 3}}}),
        ("gs", {"token": "anon"}),
    ],
    ids=["s3", "gcs"],
)
def test_refused_endpoint_through_obstore(protocol, options, short_obstore_retries):
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    url = f"{protocol}://bucket/run"
    exc = raised(save, url, {**options, "endpoint_url": endpoint, "backend": "obstore"})
    text = check_message(exc, StoreConnectionError, url, endpoint, limit=200)
    assert re.fullmatch(
        rf"\w+ {url}/\S+ failed: could not connect to {endpoint}: connection refused "
        r"\(2 retries, \d+\.\d s\)",
        text,
    ), text
    assert isinstance(exc, ConnectionError)
    assert type(exc.__cause__).__module__.startswith("obstore")
    assert "Debug source" in str(exc.__cause__)  # obstore's full report stays available


def test_refused_endpoint_through_s3fs(monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries: ~2 s
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "k", "secret": "s", "endpoint_url": endpoint, "backend": "fsspec",
               "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
    exc = raised(save, "s3://bucket/run", options)
    text = check_message(exc, StoreConnectionError, "s3://bucket/run", endpoint, limit=200)
    assert re.search(rf"failed: could not connect to {endpoint}: connection refused \(", text)
    assert type(exc.__cause__).__name__ == "EndpointConnectionError"  # botocore's


def test_refused_endpoint_through_gcsfs(monkeypatch):
    import gcsfs.retry

    monkeypatch.setattr(gcsfs.retry, "is_retriable", lambda exc: False)  # gcsfs waits ~30 s
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"token": "anon", "endpoint_url": endpoint, "backend": "fsspec"}
    exc = raised(save, "gs://bucket/run", options)
    text = check_message(exc, StoreConnectionError, "gs://bucket/run", endpoint, limit=200)
    assert re.search(rf"failed: could not connect to {endpoint}: connection refused \(", text)
    assert type(exc.__cause__).__name__ == "ClientConnectorError"  # aiohttp's


# --- no credentials -------------------------------------------------------------------------


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path, s3_server):
    """Nothing anywhere a client looks for AWS credentials (instance metadata off)."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # the session's fsspec defaults carry the test keys: only the endpoint here
    monkeypatch.setitem(__import__("fsspec").config.conf, "s3", {"endpoint_url": s3_server})
    return s3_server


@pytest.mark.parametrize("backend", ["fsspec", "auto", "obstore"])
def test_no_aws_credentials(backend, no_aws_credentials):
    endpoint = str(no_aws_credentials)
    url = "s3://bucket/run"
    options = {"endpoint_url": endpoint, "backend": backend, "skip_instance_cache": True}
    exc = raised(save, url, options)
    text = check_message(
        exc,
        StoreCredentialsError,
        url,
        f"failed: no AWS credentials found for {endpoint} {LOOKED_IN}",
        os.environ["AWS_SHARED_CREDENTIALS_FILE"],
        "instance metadata [off: AWS_EC2_METADATA_DISABLED=true])",
    )
    assert isinstance(exc, PermissionError)
    assert text.endswith(")")
    exc = raised(zarrckpt.load_pytree, url, storage_options=options)  # reading: the same error
    assert (
        type(exc) is StoreCredentialsError
        and str(exc).split(" failed: ")[1] == (text.split(" failed: ")[1])
    )


class _MetadataService(http.server.BaseHTTPRequestHandler):
    """An instance metadata service that refuses a token, as the one in the issue did."""

    requests: ClassVar[list[str]] = []

    def do_PUT(self):
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT

    def log_message(self, *args):
        pass


def test_no_aws_credentials_with_instance_metadata_on(no_aws_credentials, monkeypatch):
    """obstore's credential chain ends at the instance metadata service: its 403 (or its
    absence) means no credentials, and says so instead of ``PUT .../latest/api/token``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetadataService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    metadata = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", metadata)
    original = ob.s3_config

    def loopback_metadata(options):  # stated in the config too: never 169.254.169.254
        config, client, _ = original(options)
        return {**config, "metadata_endpoint": metadata}, client, {"max_retries": 0}

    monkeypatch.setattr(ob, "s3_config", loopback_metadata)
    endpoint = str(no_aws_credentials)
    options = {"endpoint_url": endpoint, "backend": "obstore"}
    try:
        exc = raised(save, "s3://bucket/run", options)
    finally:
        server.shutdown()
        server.server_close()
    assert _MetadataService.requests[:1] == ["PUT /latest/api/token"]
    check_message(
        exc,
        StoreCredentialsError,
        "s3://bucket/run",
        f"failed: no AWS credentials found for {endpoint} {LOOKED_IN}",
        f"instance metadata [PUT {metadata}: 403 Forbidden])",
    )
    assert "169.254.169.254" not in str(exc.__cause__)


def test_the_issue_s_metadata_probe_text():
    """The very text of the issue (instance metadata at 169.254.169.254 answering 403),
    parsed without sending anything."""
    text = (
        "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token in "
        "1.633813ms - Server returned non-2xx status code: 403 Forbidden: \n\nDebug source:\n"
        'Generic {\n    store: "S3",\n    source: RetryError(\n        RetryErrorImpl {\n'
        "            method: PUT,\n            retries: 0,\n            inner: Status {\n"
        "                status: 403,\n            },\n        },\n    ),\n}"
    )
    kind, cause = ob.explain_obstore(Exception(text), "https://s3.eu-west-1.amazonaws.com", False)
    assert kind is StoreCredentialsError
    assert cause.startswith("no AWS credentials found for https://s3.eu-west-1.amazonaws.com ")
    assert cause.endswith("instance metadata [PUT http://169.254.169.254: 403 Forbidden])")


# --- a GCS emulator without the XML API -----------------------------------------------------


@pytest.fixture(scope="module")
def plain_gcs_emulator(tmp_path_factory):
    """gcp-storage-emulator as it is (tests/gcs_emulator.py adds the XML API to it)."""
    log = str(tmp_path_factory.mktemp("plain-gcs") / "gcs.log")
    code = (
        "import sys; from gcp_storage_emulator.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["start", "--host", "127.0.0.1", "--in-memory", "-q", "--default-bucket", "bk"]
    proc, url, fh = serve([sys.executable, "-c", code, *args, "--port"], "/", log)
    yield url
    stop(proc, fh)


def test_gcs_server_without_the_xml_api_says_use_fsspec(plain_gcs_emulator, short_obstore_retries):
    endpoint = plain_gcs_emulator
    options = {"token": "anon", "endpoint_url": endpoint}
    hint = 'backend="fsspec"'
    exc = raised(save, "gs://bk/run", {**options, "backend": "obstore"})
    check_message(exc, StoreError, "gs://bk/run", endpoint, hint, "without an ETag", limit=400)
    storage = open_storage("gs://bk/run", {**options, "backend": "obstore"})
    exc = raised(asyncio.run, storage.list_dir(""))  # listing: 501 Not Implemented
    check_message(exc, StoreError, "gs://bk/run", endpoint, hint, "501 Not Implemented", limit=400)
    # and the advice works: gcsfs speaks the JSON API the emulator serves
    save("gs://bk/run", {**options, "backend": "fsspec"})
    assert zarrckpt.list_steps("gs://bk/run", storage_options={**options, "backend": "fsspec"})


# --- an unknown protocol --------------------------------------------------------------------


def test_unknown_protocol():
    exc = raised(save, "foo://bucket/run", {})
    text = str(exc)
    assert type(exc) is UnknownProtocolError and isinstance(exc, ValueError)
    assert "\n" not in text and len(text) < 250, text
    assert text.startswith("foo://bucket/run: unknown protocol 'foo'; zarrckpt opens local paths")
    assert "memory://" in text and "s3://" in text and "fsspec.available_protocols()" in text
    assert "Protocol not known" in str(exc.__cause__)  # fsspec's own
    assert "(did you mean s3://?)" in str(raised(zarrckpt.list_steps, "s4://bucket/run"))


# --- whatever else fails stays one line -----------------------------------------------------


def test_other_obstore_failures_are_one_line(s3_server):
    url = "s3://no-such-bucket-zarrckpt/run"
    options = {"key": "testing", "secret": "testing", "endpoint_url": str(s3_server)}
    exc = raised(save, url, {**options, "backend": "obstore"})
    text = check_message(exc, StoreError, url, s3_server, "answered 404 Not Found: NoSuchBucket")
    assert text.endswith("(The specified bucket does not exist)")
    assert "RequestId" not in text and "Debug source" in str(exc.__cause__)
