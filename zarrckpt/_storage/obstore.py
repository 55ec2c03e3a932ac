"""S3, GCS and Azure Blob through obstore (the Rust ``object_store`` crate).

:func:`open_obstore` serves ``s3://``, ``gs://`` and ``az://`` / ``abfs://`` URLs when obstore
is installed (``pip install 'zarrckpt[obstore]'``). Every request is made by Rust on its own
threads, so the Python cost of a request is a fraction of s3fs/gcsfs's (see
``benchmarks/bench_remote.py``). The fsspec path (``_storage.objects``) stays the fallback:
:class:`Unsupported` says why a location or a ``storage_options`` entry cannot be honoured
here (SSE-KMS, AWS profiles and config files, Google credential objects, ...), and
``open_storage`` then takes fsspec without an error.

**Keys are those fsspec writes.** object_store's ``Path`` percent-encodes ``%``, ``~``,
``[``, ... when it is *built from parts*, but obstore *parses* the strings it is given
(``Path::parse``), which keeps every character but ASCII control characters and refuses
only empty, ``.`` and ``..`` segments; each request then URL-encodes the key once. So the
object key is the very string zarrckpt asked for, as with s3fs, gcsfs and adlfs: zarrckpt's
node names escape control characters (``%XX``), and its keys never have empty or dot
segments (``check_key``). A root whose own path cannot be parsed (``bucket/a//b``, a control
character) is left to fsspec. ``tests/test_obstore.py`` writes with each client and compares
the raw listings (boto3, gcsfs, the Azure REST API) byte for byte.

**Conditional commits** (``_commit.publish``): ``put_if_unchanged`` is one PUT with
``mode="create"`` for a new root or ``UpdateVersion`` of the version read, which obstore
sends as ``If-None-Match: *`` / ``If-Match: <etag>`` (S3, Azure) or
``x-goog-if-generation-match: 0 / <generation>`` (GCS); the loser gets obstore's typed
``AlreadyExistsError`` / ``PreconditionError``. AWS, GCS and Azure enforce them. An
S3-compatible server (``endpoint_url``) may not, so the first commit to such a bucket in a
process probes it (:meth:`ObjectStoreStorage._probe_server`, 4 small requests on a
throw-away key): a server that ignores or refuses the conditions turns the root to
single-writer mode with a :class:`~zarrckpt.errors.SingleWriterWarning`, never silently.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    GenericError,
    NotSupportedError,
    PreconditionError,
)
from obstore.store import AzureStore, GCSStore, S3Store

from .._manifest import MANIFEST_MAX_BYTES
from ..errors import (
    SingleWriterWarning,
    StoreConnectionError,
    StoreCredentialsError,
    StoreError,
)
from .base import (
    Storage,
    cannot_connect,
    check_key,
    copy_each,
    no_aws_credentials,
    one_line,
    url_origin,
)
from .objects import LeaseObjects

__all__ = ["PROTOCOLS", "NoCredentials", "ObjectStoreStorage", "Unsupported", "open_obstore"]

S3_PROTOCOLS = frozenset({"s3", "s3a"})
GCS_PROTOCOLS = frozenset({"gs", "gcs"})
AZURE_PROTOCOLS = frozenset({"az", "abfs", "abfss"})
PROTOCOLS = S3_PROTOCOLS | GCS_PROTOCOLS | AZURE_PROTOCOLS

#: Objects above this size are uploaded in parts (s3fs's threshold too); below, one PUT.
_MULTIPART_BYTES = 100 * 1024 * 1024
_PART_BYTES = 16 * 1024 * 1024
#: Bodies this small are collected without another await: they arrive with the headers (within
#: TCP's initial window), so the loop thread is not held waiting for the network.
_SMALL_BODY = 16 * 1024


class Unsupported(ValueError):
    """obstore cannot honour this location or option (``open_storage`` then uses fsspec)."""


class NoCredentials(Unsupported):
    """No credentials anywhere obstore would look (fsspec then, which finds none either)."""


# --- storage_options -> obstore config ------------------------------------------------------

#: fsspec options that only tune fsspec itself (caches, its event loop, its block sizes)
_FSSPEC_ONLY = {
    "asynchronous", "loop", "skip_instance_cache", "use_listings_cache", "listings_expiry_time",
    "max_paths", "default_block_size", "default_fill_cache", "default_cache_type",
    "cache_regions", "max_concurrency", "fixed_upload_size", "block_size", "batch_size",
    "consistency", "cache_timeout", "secure_serialize", "check_connection", "timeout",
    "session_kwargs", "default_location", "access", "project", "blocksize", "location_mode",
    "assume_container_exists",
}  # fmt: skip


def _pop_false(options: dict[str, Any], *names: str) -> None:
    """Options whose default (falsy) value is harmless; anything else is unsupported."""
    for name in names:
        if options.pop(name, None):
            raise Unsupported(f"storage option {name!r}")


def _rest_unsupported(options: dict[str, Any]) -> None:
    rest = sorted(set(options) - _FSSPEC_ONLY)
    if rest:
        raise Unsupported(f"storage option {rest[0]!r}")


def _seconds(value: Any) -> str:
    return f"{float(value)}s"


def _endpoint(url: str, client: dict[str, Any]) -> str:
    if url.startswith("http://"):
        client["allow_http"] = True
    return url.rstrip("/")


def _aws_credentials_in_files() -> bool:
    home = Path.home() / ".aws"
    return any(os.environ.get(var) for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")) or any(
        Path(os.environ.get(var) or default).is_file()
        and Path(os.environ.get(var) or default).stat().st_size > 0  # empty: no credentials
        for var, default in (
            ("AWS_SHARED_CREDENTIALS_FILE", home / "credentials"),
            ("AWS_CONFIG_FILE", home / "config"),
        )
    )


Config = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]


def s3_config(options: dict[str, Any]) -> Config:
    """s3fs ``storage_options`` as obstore ``S3Store`` config, client and retry options."""
    options = dict(options)
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    config_kwargs = dict(options.pop("config_kwargs", None) or {})
    extra = dict(options.pop("s3_additional_kwargs", None) or {})
    if options.pop("profile", None) or client_kwargs.pop("profile_name", None):
        raise Unsupported("AWS profiles (credentials from files, SSO)")
    if options.pop("session", None) is not None:
        raise Unsupported("storage option 'session'")
    key = options.pop("key", None) or options.pop("username", None)
    key = key or client_kwargs.pop("aws_access_key_id", None)
    secret = options.pop("secret", None) or options.pop("password", None)
    secret = secret or client_kwargs.pop("aws_secret_access_key", None)
    no_credentials = False
    token = options.pop("token", None) or client_kwargs.pop("aws_session_token", None)
    if key or secret:
        config.update(access_key_id=key, secret_access_key=secret)
        if token:
            config["session_token"] = token
    anon = bool(options.pop("anon", False))
    if str(config_kwargs.pop("signature_version", "")).upper() == "UNSIGNED":
        anon = True
    if anon:
        config["skip_signature"] = True
    elif not (key or secret) and not any(
        os.environ.get(var)
        for var in (
            "AWS_ACCESS_KEY_ID",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        )
    ):
        if _aws_credentials_in_files():
            raise Unsupported("AWS credentials from a profile or config file")
        # raised once the endpoint is known, to name it
        no_credentials = os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"

    endpoint = (
        options.pop("endpoint_url", None)
        or client_kwargs.pop("endpoint_url", None)
        # what botocore (so s3fs) reads from the environment; object_store's own variable
        # is AWS_ENDPOINT, and it would not allow http:// without being told
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        config["endpoint"] = _endpoint(endpoint, client)
    if no_credentials:
        raise NoCredentials(no_aws_credentials(config.get("endpoint") or "AWS S3"))
    region = client_kwargs.pop("region_name", None) or config_kwargs.pop("region_name", None)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        config["region"] = region
    elif not endpoint:
        raise Unsupported("no region given (s3fs asks AWS for the bucket's region)")
    use_ssl = options.pop("use_ssl", True)
    use_ssl = client_kwargs.pop("use_ssl", use_ssl)
    if not use_ssl and not str(endpoint or "").startswith("http://"):
        raise Unsupported("use_ssl=False without an http:// endpoint_url")
    verify = client_kwargs.pop("verify", True)
    if verify is False:
        client["allow_invalid_certificates"] = True
    elif isinstance(verify, str):
        client["root_certificate"] = verify
    addressing = (config_kwargs.pop("s3", None) or {}).get("addressing_style", "auto")
    if addressing == "virtual":
        config["virtual_hosted_style_request"] = True
    for name in ("connect_timeout", "read_timeout"):
        if name in config_kwargs:
            client["connect_timeout" if name == "connect_timeout" else "timeout"] = _seconds(
                config_kwargs.pop(name)
            )
    retries = config_kwargs.pop("retries", None) or {}
    if "max_attempts" in retries or "total_max_attempts" in retries:  # botocore counts the first
        setting = "total_max_attempts" if "total_max_attempts" in retries else "max_attempts"
        retry["max_retries"] = max(0, int(retries[setting]) - 1)
    if options.pop("requester_pays", False) or extra.pop("RequestPayer", None):
        config["request_payer"] = True
    sse = extra.pop("ServerSideEncryption", None)
    if sse == "AES256":
        config["server_side_encryption"] = "AES256"
    elif sse is not None:
        raise Unsupported(f"server-side encryption {sse!r} (SSE-KMS)")
    _pop_false(options, "version_aware")
    if extra or client_kwargs or config_kwargs:
        first = next(iter(extra or client_kwargs or config_kwargs))
        raise Unsupported(f"storage option {first!r}")
    _rest_unsupported(options)
    config["conditional_put"] = "etag"  # If-Match / If-None-Match (object_store's default too)
    return config, client, retry


def _google_credentials(token: Any, config: dict[str, Any]) -> None:
    if token is None or token == "google_default":
        return  # object_store's chain: GOOGLE_* variables, the ADC file, the metadata server
    if token == "anon":
        config["skip_signature"] = True  # unsigned reads
        config["bearer_token"] = ""  # writes carry no credentials (an emulator, a public bucket)
        return
    info: Any = token
    if isinstance(token, (str, os.PathLike)) and Path(token).is_file():
        info = json.loads(Path(token).read_text())
        if info.get("type") == "authorized_user":
            config["application_credentials"] = os.fspath(token)
            return
        if info.get("type") == "service_account":
            config["service_account_path"] = os.fspath(token)
            return
    if isinstance(info, dict) and info.get("type") == "service_account":
        config["service_account_key"] = json.dumps(info)
        return
    raise Unsupported("this kind of Google credentials (token=...)")


def gcs_config(options: dict[str, Any]) -> Config:
    """gcsfs ``storage_options`` as obstore ``GCSStore`` config, client and retry options."""
    options = dict(options)
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    _google_credentials(options.pop("token", None), config)
    endpoint = options.pop("endpoint_url", None) or os.environ.get("STORAGE_EMULATOR_HOST")
    if endpoint:
        config["base_url"] = _endpoint(endpoint, client)
    _pop_false(options, "requester_pays", "user_project", "kms_key_name", "version_aware")
    _rest_unsupported(options)
    return config, client, {}


def _connection_string(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)


def azure_config(options: dict[str, Any]) -> Config:
    """adlfs ``storage_options`` as obstore ``AzureStore`` config, client and retry options."""
    options = dict(options)
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    conn = _connection_string(options.pop("connection_string", None) or "")
    if conn.get("UseDevelopmentStorage", "").lower() == "true":
        config["use_emulator"] = True
        client["allow_http"] = True
    for ours, theirs in (("account_name", "AccountName"), ("account_key", "AccountKey")):
        value = options.pop(ours, None) or conn.get(theirs)
        if value:
            config[ours] = value
    sas = options.pop("sas_token", None) or conn.get("SharedAccessSignature")
    if sas:
        config["sas_key"] = sas.lstrip("?")
    for name in ("client_id", "client_secret", "tenant_id"):
        if options.get(name):
            config[name] = options.pop(name)
    if options.pop("anon", False):
        config["skip_signature"] = True
    if options.pop("credential", None) is not None:
        raise Unsupported("storage option 'credential' (a credential object)")
    endpoint = options.pop("endpoint_url", None) or conn.get("BlobEndpoint")
    host = options.pop("account_host", None)
    if endpoint:
        config["endpoint"] = _endpoint(endpoint, client)
    elif host:
        config["endpoint"] = f"https://{host}"
    elif "EndpointSuffix" in conn and "account_name" in config:
        scheme = conn.get("DefaultEndpointsProtocol", "https")
        config["endpoint"] = f"{scheme}://{config['account_name']}.blob.{conn['EndpointSuffix']}"
    _pop_false(options, "version_aware")
    for name in ("max_concurrency", "timeout", "connection_timeout", "read_timeout"):
        options.pop(name, None)
    _rest_unsupported(options)
    return config, client, {}


# --- locations ------------------------------------------------------------------------------


def _check_prefix(url: str, prefix: str) -> str | None:
    """The root's path inside its bucket, if obstore keeps it byte for byte."""
    prefix = prefix.strip("/")
    if not prefix:
        return None
    if any(part in ("", ".", "..") for part in prefix.split("/")) or any(
        ord(c) < 0x20 or c == "\x7f" for c in prefix
    ):
        raise Unsupported(f"{url}: a path obstore would not store as it is")
    return prefix


def _split(protocol: str, path: str) -> tuple[str, str, str | None]:
    """``(bucket, path, account)`` of a URL without its protocol."""
    bucket, _, rest = path.partition("/")
    account = None
    if protocol in AZURE_PROTOCOLS and "@" in bucket:  # abfs://container@account.dfs.core...
        bucket, _, host = bucket.partition("@")
        account = host.split(".", 1)[0]
    if not bucket:
        raise Unsupported(f"{protocol}://{path}: no bucket")
    return bucket, rest, account


def open_obstore(url: str, protocol: str, path: str, options: dict[str, Any]) -> ObjectStoreStorage:
    """A storage for ``protocol://path``, or :class:`Unsupported` (then use fsspec)."""
    if _used_in_pid not in (None, os.getpid()):
        raise Unsupported(
            "this process was forked from one that used obstore, whose Rust runtime does not "
            "survive fork() (requests would hang)"
        )
    bucket, rest, account = _split(protocol, path)
    prefix = _check_prefix(url, rest)
    probe = None
    if protocol in S3_PROTOCOLS:
        config, client, retry = s3_config(options)
        kind: Any = S3Store
        if "endpoint" in config:  # an S3-compatible server: does it enforce conditions?
            probe = (config["endpoint"], bucket)
    elif protocol in GCS_PROTOCOLS:
        config, client, retry = gcs_config(options)
        kind = GCSStore
    else:
        config, client, retry = azure_config(options)
        if account and "account_name" not in config:
            config["account_name"] = account
        kind = AzureStore
    args = json.dumps([kind.__name__, bucket, prefix, config, client, retry], sort_keys=True)
    storage = ObjectStoreStorage(_store(args), url.rstrip("/"), probe=probe)
    storage.endpoint = _default_endpoint(kind, config)
    return storage


def _default_endpoint(kind: Any, config: dict[str, Any]) -> str:
    """Where a store's requests go (for messages)."""
    if kind is S3Store:
        region = config.get("region") or "us-east-1"
        return config.get("endpoint") or f"https://s3.{region}.amazonaws.com"
    if kind is GCSStore:
        return config.get("base_url") or "https://storage.googleapis.com"
    account = config.get("account_name") or "<account>"
    return config.get("endpoint") or f"https://{account}.blob.core.windows.net"


@functools.lru_cache(maxsize=32)
def _store(args: str) -> Any:
    """One obstore store per configuration: its HTTP connections are reused across saves."""
    kind, bucket, prefix, config, client, retry = json.loads(args)
    cls = {"S3Store": S3Store, "GCSStore": GCSStore, "AzureStore": AzureStore}[kind]
    return cls(
        bucket, prefix=prefix, config=config, client_options=client, retry_config=retry or None
    )


# --- failures as messages a person can act on ------------------------------------------------

# obstore's errors are text: a first line (``Error performing GET <uri> in 2.57s, after 10
# retries, ...``), then object_store's Rust ``Debug`` form (``RetryError { ..., inner: Http {
# kind: Connect, ... Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }``).
_PERFORMING = re.compile(
    r"Error performing (?P<method>[A-Z]+) (?P<uri>\S+) in (?P<took>[0-9.]+)(?P<unit>ns|µs|us|ms|s)\b"
)
_RETRIES = re.compile(r"\bafter (\d+) retries|\bretries: (\d+)")
_STATUS = re.compile(r"status code: (\d{3})((?: [A-Z][A-Za-z-]*)*)")
_OS_MESSAGE = re.compile(r'\bOs \{[^}]*?message: "([^"]+)"', re.S)
_DNS = re.compile(r"dns error: ([^\n\"(]+)")
#: an S3 / GCS / Azure error document in the response body
_ERROR_CODE = re.compile(r"<Code>([^<]{1,80})</Code>")
_ERROR_MESSAGE = re.compile(r"<Message>([^<]{1,200})</Message>")
_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
#: the instance metadata service's paths: the last place object_store looks for AWS credentials
_IMDS_PATHS = ("/latest/api/token", "/latest/meta-data")


def explain_obstore(
    exc: BaseException, endpoint: str | None, gcs: bool
) -> tuple[type[StoreError], str] | None:
    """What an obstore error means, parsed from its text, or None (then its first line)."""
    text = str(exc)
    performing = _PERFORMING.search(text)
    uri = performing["uri"] if performing else ""
    origin = url_origin(uri) or endpoint or "the endpoint"
    status = _STATUS.search(text)
    said = f"{status[1]}{status[2]}" if status else None  # "403 Forbidden"
    connect = re.search(r"\bkind: Connect\b|tcp connect error|\bConnectError\b", text)
    timeout = re.search(r"\bkind: Timeout\b|\btimed out\b", text, re.I)
    os_message, dns = _OS_MESSAGE.search(text), _DNS.search(text)
    if dns:
        reason = f"host not found ({dns[1].strip()})"
    elif os_message:
        reason = os_message[1][:1].lower() + os_message[1][1:]  # "connection refused"
    elif timeout:
        reason = "timed out"
    else:
        reason = "connection failed"
    if urlsplit(uri).path.startswith(_IMDS_PATHS):  # no credentials elsewhere
        what = said or (reason if connect or timeout else one_line(exc)[:80])
        metadata = f"{performing['method']} {origin}: {what}" if performing else what
        return StoreCredentialsError, no_aws_credentials(endpoint, metadata)
    if gcs and ((said and said.startswith("501")) or "MissingEtag" in text):
        answer = (
            f"{performing['method']} answered {said}"
            if performing and said
            else "a PUT answered without an ETag"
        )
        return StoreError, (
            f"the server at {endpoint or origin} does not serve the GCS XML API that obstore "
            f'speaks ({answer}; nor do most GCS emulators): pass backend="fsspec" '
            "(storage_options or ZARRCKPT_STORAGE_BACKEND=fsspec) to use gcsfs"
        )
    if connect or (timeout and not status):
        found = _RETRIES.search(text)
        retries = int(found[1] or found[2]) if found else None
        took = float(performing["took"]) * _UNITS[performing["unit"]] if performing else None
        if connect:
            return StoreConnectionError, cannot_connect(origin, reason, retries, took)
        detail = ", ".join(
            ([] if retries is None else [f"{retries} retries"])
            + ([] if took is None else [f"{took:.1f} s"])
        )
        return StoreConnectionError, f"no answer from {origin}: timed out ({detail})"
    if performing and said:  # the server's answer, without the body's request ids
        code, message = _ERROR_CODE.search(text), _ERROR_MESSAGE.search(text)
        answer = f"{type(exc).__name__}: {performing['method']} {origin} answered {said}"
        answer += f": {code[1]}" if code else ""
        return StoreError, answer + (f" ({message[1]})" if message else "")
    return None


# --- the storage ----------------------------------------------------------------------------


def _let_rust_settle() -> None:
    """At exit, give obstore's runtime threads a moment to finish (Python < 3.14).

    Just after an async obstore call returns, its Rust task still takes the GIL once more to
    release Python objects. If the interpreter is finalizing by then, CPython ends that
    (non-Python) thread with ``pthread_exit``, which Rust cannot unwind through: the process
    aborts (SIGABRT, exit status -6, nothing printed) after a successful run. Seen in ~20% of
    short scripts that used obstore's async API; 5 ms of grace removed it in 90 of 90 runs.
    """
    time.sleep(0.05)


#: the process that opened obstore roots (its runtime's threads are gone in a forked child)
_used_in_pid: int | None = None
#: (endpoint, bucket) -> whether the server enforces conditional PUTs (probed once a process)
_PROBED: dict[tuple[str, str], str | None] = {}
_warned: set[str] = set()


class ObjectStoreStorage(LeaseObjects, Storage):
    """One checkpoint root on S3, GCS or Azure Blob through an obstore store."""

    leases = True
    conditional_writes = True

    def __init__(self, store: Any, url: str, probe: tuple[str, str] | None = None) -> None:
        global _used_in_pid
        if _used_in_pid != os.getpid() and sys.version_info < (3, 14):
            atexit.register(_let_rust_settle)
        _used_in_pid = os.getpid()
        self.store = store
        self.url = url
        self.conditional_writes = True
        self._probe = probe  # probed at the first conditional write, then None

    def explain(self, exc: Exception, elapsed: float) -> tuple[type[StoreError], str]:
        gcs = isinstance(self.store, GCSStore)
        explained = explain_obstore(exc, self.endpoint, gcs)
        if explained is not None:
            return explained
        text = one_line(exc)  # the whole of it stays on __cause__
        return StoreError, text if len(text) <= 300 else text[:299] + "…"

    async def get(self, key: str, limit: int | None = None) -> bytes | None:
        async with self.errors("reading", check_key(self.url, key)):
            try:
                return (await self._get(key, limit))[0]
            except FileNotFoundError:  # obstore's NotFoundError
                return None

    async def _get(self, key: str, limit: int | None = None) -> tuple[bytes, obstore.ObjectMeta]:
        result = await obstore.get_async(self.store, key)
        if limit is not None and result.meta["size"] > limit:
            # The size comes with the headers: the body is never collected (dropping the
            # result closes its stream).
            raise self.too_large(key, result.meta["size"], limit)
        if result.meta["size"] <= _SMALL_BODY:
            # The body came with the headers: collecting it here saves a second trip through
            # the asyncio <-> Rust bridge (~0.1 ms of CPU, a third of a small read's cost).
            body = result.bytes()
        else:
            body = await result.bytes_async()
        return bytes(body), result.meta

    async def _put(self, key: str, data: Any, mode: Any = None) -> None:
        size = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        await obstore.put_async(
            self.store,
            key,
            data,
            mode=mode,
            use_multipart=size > _MULTIPART_BYTES,
            chunk_size=_PART_BYTES,
        )

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        if len(parts) == 1:
            data = parts[0] if isinstance(parts[0], bytes) else memoryview(parts[0]).cast("B")
        else:
            data = b"".join(memoryview(p).cast("B") for p in parts)
        async with self.errors("writing", check_key(self.url, key)):
            await self._put(key, data)

    async def put_atomic(self, key: str, data: bytes) -> None:
        await self.put(key, [data])  # one PUT of one object is atomic

    async def link_many(self, src_dir: str, dst_dir: str, keys: Sequence[str]) -> set[str]:
        """Server-side copies (S3 CopyObject, GCS rewrite, Azure copy blob)."""

        async def copy(src: str, dst: str) -> None:
            await obstore.copy_async(self.store, check_key(self.url, src), check_key(self.url, dst))

        return await copy_each(src_dir, dst_dir, keys, copy)

    async def delete(self, key: str) -> None:
        async with self.errors("deleting", check_key(self.url, key)):
            with contextlib.suppress(FileNotFoundError):  # GCS, Azure: 404 if absent
                await obstore.delete_async(self.store, key)

    async def list_dir(self, prefix: str = "") -> list[str]:
        async with self.errors("listing", check_key(self.url, prefix)):
            found = await obstore.list_with_delimiter_async(self.store, prefix or None)
        names = [p.rsplit("/", 1)[-1] for p in found["common_prefixes"]]
        names += [o["path"].rsplit("/", 1)[-1] for o in found["objects"]]
        return sorted(names)

    async def delete_dir(self, prefix: str) -> None:
        async with self.errors("deleting", check_key(self.url, prefix)):
            paths = [
                meta["path"]
                async for batch in obstore.list(self.store, prefix, chunk_size=1000)
                for meta in batch
            ]
            if paths:
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile (GCS, Azure)
                    await obstore.delete_async(self.store, paths)

    # --- conditional publication -------------------------------------------------------------

    async def get_with_token(
        self, key: str, limit: int | None = MANIFEST_MAX_BYTES
    ) -> tuple[bytes | None, Any]:
        async with self.errors("reading", check_key(self.url, key)):
            try:
                data, meta = await self._get(key, limit)
            except FileNotFoundError:
                return None, None
        # the token is an UpdateVersion: S3 and Azure compare the ETag, GCS the generation
        return data, {k: meta[k] for k in ("e_tag", "version") if meta[k] is not None}

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        if self._probe is not None:
            await self._check_server()
        if not self.conditional_writes:
            await self.put_atomic(key, data)
            return True
        mode = "create" if token is None else dict(token)
        async with self.errors("writing", check_key(self.url, key)):
            try:
                await self._put(key, data, mode)
            except (AlreadyExistsError, PreconditionError):
                return False  # another writer published since ``token`` was read
        return True

    async def _check_server(self) -> None:
        assert self._probe is not None
        probe, self._probe = self._probe, None
        if probe not in _PROBED:
            _PROBED[probe] = await self._probe_server()
        problem = _PROBED[probe]
        if problem is None:
            return
        self.conditional_writes = False
        if self.url not in _warned:
            _warned.add(self.url)
            warnings.warn(
                f"{self.url}: the S3 server at {probe[0]} {problem}, so zarrckpt assumes one "
                "writer at a time on this root; two concurrent writers may lose a commit "
                "(see the README's Safety section)",
                SingleWriterWarning,
                stacklevel=4,
            )

    async def _probe_server(self) -> str | None:
        """None if the server enforces ``If-None-Match: *`` and ``If-Match``; else what it did.

        Four requests on a fresh key beside the manifest: create it, create it again (must
        fail), replace it under a wrong ETag (must fail), delete it.
        """
        key = f".zarrckpt-probe.{uuid.uuid4().hex}"
        async with self.errors("probing conditional writes at", key):
            try:
                await self._put(key, b"", "create")
                try:
                    await self._put(key, b"", "create")
                    return "ignored If-None-Match (a second create succeeded)"
                except AlreadyExistsError:
                    pass
                try:
                    await self._put(key, b"", {"e_tag": '"zarrckpt-probe"'})
                    return "ignored If-Match (a write under a wrong ETag succeeded)"
                except PreconditionError:
                    pass
                return None
            except (NotSupportedError, GenericError) as exc:  # e.g. 501 Not Implemented
                return f"refused conditional writes ({type(exc).__name__})"
            finally:
                with contextlib.suppress(Exception):  # a stray empty object harms nobody
                    await obstore.delete_async(self.store, key)
