"""obstore: the choice of client, storage_options mapping, identical object keys, conditional
commits on S3, GCS and Azure, the probe of S3-compatible servers, requests counted at the server.

The contract suite (``url`` fixture: ``s3-obstore``, ``gcs-obstore``, ``azure``) covers the rest.
"""

import asyncio
import http.client
import http.server
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import boto3
import fsspec
import numpy as np
import pytest
from helpers import assert_same

import zarrckpt
from zarrckpt import ConcurrentWriteError, SingleWriterWarning, StoreError
from zarrckpt._storage import OBSTORE_PROTOCOLS, S3Storage, StoreStorage, open_storage
from zarrckpt._storage import obstore as ob
from zarrckpt._sync import run

OBSTORE_BACKENDS = ["s3-obstore", "gcs-obstore", "azure"]

#: dict keys that exercise every character class of object keys: zarrckpt escapes %, /, \,
#: control characters, "." / ".." / "" and a leading "__"; everything else is stored as is
NASTY_KEYS = [
    "a/b", "t~i[1]", "x y%", '{}^`"<>#|*?', "é∑ unicode", "+=&;,:@$!'()", "..", ".", "",
    "__x", "ctl\x01\t\x7f", "%41", "back\\slash", "[", "]~",
]  # fmt: skip


def nasty_state():
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(3).astype(np.float32) for k in NASTY_KEYS}
    state["nested"] = {k: {7: np.arange(i + 1)} for i, k in enumerate(NASTY_KEYS[:5])}
    state["s"] = "text"
    return state


def _root(request, backend):
    return request.getfixturevalue(f"{backend.replace('-', '_')}_root")


# --- which client serves a URL -----------------------------------------------------------------


def test_obstore_is_the_default_where_installed(s3_root, gcs_root, monkeypatch):
    monkeypatch.delenv("ZARRCKPT_STORAGE_BACKEND")
    assert ob.PROTOCOLS == OBSTORE_PROTOCOLS
    for url, options in (s3_root, gcs_root):
        assert isinstance(open_storage(url, options), ob.ObjectStoreStorage)
        fallback = open_storage(url, {**options, "backend": "fsspec"})
        assert isinstance(fallback, StoreStorage) and not isinstance(
            fallback, ob.ObjectStoreStorage
        )
        assert isinstance(open_storage(url, options, backend="fsspec"), StoreStorage)
    assert isinstance(open_storage(s3_root[0], {**s3_root[1], "backend": "fsspec"}), S3Storage)
    # the environment variable states a preference; the option and the argument win over it
    monkeypatch.setenv("ZARRCKPT_STORAGE_BACKEND", "fsspec")
    assert isinstance(open_storage(*s3_root), S3Storage)
    assert isinstance(open_storage(*s3_root, backend="obstore"), ob.ObjectStoreStorage)
    # other protocols are fsspec's, whatever the environment says
    monkeypatch.setenv("ZARRCKPT_STORAGE_BACKEND", "obstore")
    assert isinstance(open_storage("memory://x/run"), StoreStorage)


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"profile": "dev"}, "AWS profiles"),
        ({"s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"}}, "SSE-KMS"),
        ({"s3_additional_kwargs": {"SSEKMSKeyId": "k"}}, "SSEKMSKeyId"),
        ({"client_kwargs": {"profile_name": "sso"}}, "AWS profiles"),
        ({"some_new_s3fs_option": 1}, "some_new_s3fs_option"),
    ],
)
def test_options_obstore_cannot_take_fall_back_to_fsspec(s3_root, monkeypatch, extra, reason):
    monkeypatch.delenv("ZARRCKPT_STORAGE_BACKEND")
    url, options = s3_root
    assert isinstance(open_storage(url, {**options, **extra}), S3Storage)  # no error
    with pytest.raises(ValueError, match=f"backend='obstore' cannot open {url}: .*{reason}"):
        open_storage(url, {**options, **extra, "backend": "obstore"})


def test_bad_backend_choices_are_errors(s3_root):
    url, options = s3_root
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'obstore', 'fsspec'"):
        open_storage(url, {**options, "backend": "boto"})
    with pytest.raises(ValueError, match="backend='fsspec' but storage_options say"):
        open_storage(url, {**options, "backend": "obstore"}, backend="fsspec")
    with pytest.raises(ValueError, match="backend='obstore' serves s3://, gs:// and az://"):
        open_storage("memory://x/run", {"backend": "obstore"})
    # a local path takes no storage_options, but the backend key is not one
    assert type(open_storage("some/dir", {"backend": "fsspec"})).__name__ == "LocalStorage"
    # a root path obstore would not keep byte for byte goes to fsspec (or is refused)
    assert isinstance(open_storage(url + "//x", options), StoreStorage)
    with pytest.raises(ValueError, match="a path obstore would not store as it is"):
        open_storage(url + "//x", {**options, "backend": "obstore"})


def test_public_functions_take_the_backend_option(s3_root, s3_server):
    url, options = s3_root
    state = {"w": np.arange(5)}
    zarrckpt.save_pytree(
        url, state, storage_options={**options, "backend": "obstore"}, verbose=False
    )
    for backend in ("obstore", "fsspec"):
        opts = {**options, "backend": backend}
        assert_same(zarrckpt.load_pytree(url, storage_options=opts), state)
        assert zarrckpt.list_steps(url, storage_options=opts) == [0]
        assert zarrckpt.open_checkpoint(url, storage_options=opts)["w"][2] == 2


# --- storage_options -> obstore configuration ---------------------------------------------------


@pytest.mark.parametrize(
    "options, config, client",
    [
        (
            {"key": "K", "secret": "S", "token": "T", "endpoint_url": "http://h:9000"},
            {"access_key_id": "K", "secret_access_key": "S", "session_token": "T",
             "endpoint": "http://h:9000"},
            {"allow_http": True},
        ),
        (
            {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}},
            {"skip_signature": True, "region": "eu-west-1"},
            {},
        ),
        (
            {"client_kwargs": {"aws_access_key_id": "K", "aws_secret_access_key": "S",
                               "endpoint_url": "https://h", "verify": False},
             "config_kwargs": {"s3": {"addressing_style": "virtual"}, "read_timeout": 7,
                               "connect_timeout": 2},
             "requester_pays": True, "max_concurrency": 4, "skip_instance_cache": True,
             "s3_additional_kwargs": {"ServerSideEncryption": "AES256"}},
            {"access_key_id": "K", "secret_access_key": "S", "endpoint": "https://h",
             "virtual_hosted_style_request": True, "request_payer": True,
             "server_side_encryption": "AES256"},
            {"allow_invalid_certificates": True, "timeout": "7.0s", "connect_timeout": "2.0s"},
        ),
        (
            {"config_kwargs": {"signature_version": "UNSIGNED"}, "username": "u", "password": "p"},
            {"skip_signature": True, "access_key_id": "u", "secret_access_key": "p"},
            {},
        ),
    ],
)  # fmt: skip
def test_s3_options_map_onto_obstore(monkeypatch, options, config, client):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    got_config, got_client, _ = ob.s3_config(options)
    expected = {"region": "us-east-1", "conditional_put": "etag", **config}
    assert got_config == expected
    assert got_client == client


def test_s3_credentials_obstore_would_not_find_go_to_fsspec(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    with pytest.raises(ob.Unsupported, match="no region given"):
        ob.s3_config({"key": "K", "secret": "S"})  # s3fs asks AWS where the bucket is
    (tmp_path / "credentials").write_text("[default]\n")
    with pytest.raises(ob.Unsupported, match="profile or config file"):
        ob.s3_config({"client_kwargs": {"region_name": "us-east-1"}})
    monkeypatch.setenv("AWS_PROFILE", "dev")
    with pytest.raises(ob.Unsupported, match="profile"):
        ob.s3_config({"client_kwargs": {"region_name": "us-east-1"}})
    _, _, retry = ob.s3_config(
        {
            "key": "K",
            "secret": "S",
            "endpoint_url": "http://h",
            "config_kwargs": {"retries": {"max_attempts": 3}},
        }
    )
    assert retry == {"max_retries": 2}


def test_gcs_and_azure_options_map_onto_obstore(tmp_path):
    assert ob.gcs_config({"token": "anon", "endpoint_url": "http://h:1", "project": "p"})[:2] == (
        {"skip_signature": True, "bearer_token": "", "base_url": "http://h:1"},
        {"allow_http": True},
    )
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "x"}))
    assert ob.gcs_config({"token": str(key)})[0] == {"service_account_path": str(key)}
    assert ob.gcs_config({"token": {"type": "service_account", "a": 1}})[0] == {
        "service_account_key": json.dumps({"type": "service_account", "a": 1})
    }
    assert ob.gcs_config({"token": "google_default"})[0] == {}
    for unsupported in ({"token": "browser"}, {"requester_pays": True}, {"kms_key_name": "k"}):
        with pytest.raises(ob.Unsupported):
            ob.gcs_config(unsupported)
    conn = "DefaultEndpointsProtocol=https;AccountName=acc;AccountKey=KEY;EndpointSuffix=core.windows.net"
    assert ob.azure_config({"connection_string": conn})[0] == {
        "account_name": "acc",
        "account_key": "KEY",
        "endpoint": "https://acc.blob.core.windows.net",
    }
    assert ob.azure_config({"account_name": "a", "sas_token": "?sv=1&sig=x"})[0] == {
        "account_name": "a",
        "sas_key": "sv=1&sig=x",
    }
    assert ob.azure_config({"connection_string": "UseDevelopmentStorage=true"})[:2] == (
        {"use_emulator": True},
        {"allow_http": True},
    )
    with pytest.raises(ob.Unsupported, match="credential"):
        ob.azure_config({"account_name": "a", "credential": object()})


# --- identical object keys whichever client writes ----------------------------------------------

_STEP = re.compile(r"step_\d{10}\.[0-9a-f]+")


def _relative(keys, prefix):
    """Keys under ``prefix``, relative to it, with the step directory's name normalised."""
    return sorted(_STEP.sub("step_N", k[len(prefix) :]) for k in keys if k.startswith(prefix))


def _s3_keys(server, bucket):
    client = boto3.client(
        "s3", endpoint_url=server, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )  # fmt: skip
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _gcs_keys(options, bucket):
    fs = fsspec.filesystem("gs", skip_instance_cache=True, **options)  # gcsfs: the JSON API
    return [p[len(bucket) + 1 :] for p in fs.find(bucket)]


def _save_and_list(request, backend, state):
    """Save ``state`` under ``<bucket>/<backend>``; the raw keys of the whole bucket."""
    url, options = _root(request, backend)
    url = f"{url.rsplit('/', 1)[0]}/{backend}"
    zarrckpt.save_pytree(url, state, storage_options=options, verbose=False)
    bucket = url.split("://")[1].split("/")[0]
    if backend.startswith("s3"):
        keys = _s3_keys(request.getfixturevalue("s3_server"), bucket)
    elif backend.startswith("gcs"):
        keys = _gcs_keys({k: v for k, v in options.items() if k != "backend"}, bucket)
    else:
        from servers import azure_list

        keys = azure_list(request.getfixturevalue("azure_server"), bucket)
    return url, options, keys


@pytest.mark.parametrize("service", ["s3", "gcs"])
def test_keys_are_identical_whichever_client_writes(request, service):
    state = nasty_state()
    url_f, opts_f, keys_f = _save_and_list(request, service, state)
    url_o, opts_o, keys_o = _save_and_list(request, f"{service}-obstore", state)
    ours = _relative(keys_o, f"{service}-obstore/")
    theirs = _relative(keys_f, f"{service}/")
    assert ours == theirs  # byte for byte, e.g. "step_N/a%2Fb/c.0" and "step_N/t~i[1]/..."
    assert "step_N/a%2Fb/c.0" in ours and "step_N/x y%25/c.0" in ours
    assert "step_N/ctl%01%09%7F/zarr.json" in ours and "step_N/%2E%2E/c.0" in ours
    # each client reads the other's checkpoint
    assert_same(
        zarrckpt.load_pytree(url_f, storage_options={**opts_o, "backend": "obstore"}), state
    )
    assert_same(zarrckpt.load_pytree(url_o, storage_options={**opts_f, "backend": "fsspec"}), state)


def test_azure_keys_are_those_s3_gets(request):
    state = nasty_state()
    _, _, s3_keys = _save_and_list(request, "s3", state)
    url, options, az_keys = _save_and_list(request, "azure", state)
    assert _relative(az_keys, "azure/") == _relative(s3_keys, "s3/")
    assert_same(zarrckpt.load_pytree(url, storage_options=options), state)


def test_tensorstore_reads_leaves_obstore_wrote(request, s3_server, monkeypatch):
    ts = pytest.importorskip("tensorstore")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    state = nasty_state()
    url, _, keys = _save_and_list(request, "s3-obstore", state)
    bucket = url.split("://")[1].split("/")[0]
    step = _STEP.search(keys[0]).group()
    for name, key in (("a%2Fb", "a/b"), ("t~i[1]", "t~i[1]"), ("x y%25", "x y%")):
        spec = {"driver": "zarr3", "kvstore": {
            "driver": "s3", "bucket": bucket, "path": f"s3-obstore/{step}/{name}/", "endpoint": s3_server,
            "aws_region": "us-east-1", "aws_credentials": {"type": "environment"}}}  # fmt: skip
        np.testing.assert_array_equal(ts.open(spec).result().read().result(), state[key])


# --- conditional commits: two writers on one root ----------------------------------------------


@pytest.mark.parametrize("backend", [*OBSTORE_BACKENDS, "gcs"])  # "gcs": gcsfs, generations
def test_a_commit_that_lost_the_race_raises_and_cleans_up(request, backend, monkeypatch):
    import zarrckpt._write as api

    url, options = _root(request, backend)
    zarrckpt.save_pytree(url, {"who": "first"}, storage_options=options, verbose=False)
    assert open_storage(url, options).conditional_writes
    original = api.write_step

    async def interleaved(*args, **kwargs):
        await original(*args, **kwargs)
        monkeypatch.setattr(api, "write_step", original)  # the other writer commits now
        await asyncio.to_thread(
            zarrckpt.save_pytree, url, {"who": "other"}, storage_options=options, keep=None,
            verbose=False,
        )  # fmt: skip

    monkeypatch.setattr(api, "write_step", interleaved)
    with pytest.raises(ConcurrentWriteError, match="another writer committed while step 1"):
        zarrckpt.save_pytree(
            url, {"who": "loser"}, storage_options=options, keep=None, verbose=False
        )
    monkeypatch.setattr(api, "write_step", original)
    assert zarrckpt.load_pytree(url, storage_options=options) == {"who": "other"}
    storage = open_storage(url, options)
    dirs = [n for n in run(storage.list_dir("")) if n.startswith("step_")]
    assert len(dirs) == len(zarrckpt.list_steps(url, storage_options=options)) == 2


WRITER = textwrap.dedent(
    """
    import json, sys, time, numpy as np, zarrckpt
    url, options, who, go = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    print("ready", flush=True)
    while not __import__("os").path.exists(go):
        time.sleep(0.01)
    for i in range(5):
        state = {"who": who, "i": i, "data": {f"x{k}": np.full(16, i, np.int32) for k in range(20)}}
        try:
            zarrckpt.save_pytree(url, state, storage_options=options, keep=None, verbose=False)
            print(json.dumps({"ok": [who, i]}), flush=True)
        except zarrckpt.ConcurrentWriteError as exc:
            print(json.dumps({"conflict": [who, i, str(exc)]}), flush=True)
    """
)


def test_two_processes_saving_to_one_root_on_each_backend(request, tmp_path):
    """Every save either commits or raises ConcurrentWriteError; no commit is ever lost."""
    roots = {b: _root(request, b) for b in OBSTORE_BACKENDS}
    url, options = request.getfixturevalue("gcs_root")  # gcsfs, with generation preconditions
    roots["gcs"] = url.replace("/run", "/gcsfs"), {**options, "backend": "fsspec"}
    go = tmp_path / "go"
    procs = {
        (backend, who): subprocess.Popen(
            [sys.executable, "-c", WRITER, url, json.dumps(options), who, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for backend, (url, options) in roots.items()
        for who in ("a", "b")
    }
    for proc in procs.values():  # imports done: start together
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    outputs = {key: proc.communicate(timeout=120) for key, proc in procs.items()}
    for key, proc in procs.items():
        assert proc.returncode == 0, (key, outputs[key][1][-3000:])
    for backend, (url, options) in roots.items():
        results = [
            json.loads(line)
            for (b, _), (out, _) in outputs.items()
            if b == backend
            for line in out.splitlines()
        ]
        assert len(results) == 10, backend
        wins = {tuple(r["ok"]) for r in results if "ok" in r}
        steps = zarrckpt.list_steps(url, storage_options=options)
        assert len(steps) == len(wins), backend  # no committed save was lost
        seen = set()
        for step in steps:
            state = zarrckpt.load_pytree(url, step=step, storage_options=options)
            seen.add((state["who"], state["i"]))
        assert seen == wins, backend


# --- S3-compatible servers that ignore conditional writes --------------------------------------


class _Proxy(http.server.ThreadingHTTPServer):
    """Forwards to ``target``; ``mode`` "strip" drops If-Match/If-None-Match (a server that
    ignores them), "refuse" answers 501 to a request carrying them."""

    daemon_threads = True

    def __init__(self, target: str, mode: str) -> None:
        self.target, self.mode, self.requests = target, mode, Counter()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host",)}
        conditional = {k for k in headers if k.lower() in ("if-match", "if-none-match")}
        self.server.requests[self.command] += 1
        if conditional and self.server.mode == "refuse":
            self.send_response(501)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        for k in conditional:
            del headers[k]
        host = self.server.target.split("://")[1]
        conn = http.client.HTTPConnection(host, timeout=30)
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    "mode, problem",
    [("strip", "ignored If-None-Match"), ("refuse", "refused conditional writes")],
)
def test_a_server_that_ignores_conditions_is_single_writer_with_a_warning(
    s3_server, s3_root, mode, problem
):
    proxy = _Proxy(s3_server, mode)
    try:
        url, options = s3_root
        options = {**options, "endpoint_url": proxy.url, "backend": "obstore",
                   "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
        with pytest.warns(SingleWriterWarning, match=rf"{url}: the S3 server at .* {problem}"):
            zarrckpt.save_pytree(url, {"v": 1}, storage_options=options, verbose=False)
        proxy.requests.clear()
        zarrckpt.save_pytree(url, {"v": 2}, storage_options=options, verbose=False)  # no 2nd probe
        storage = open_storage(url, options)
        run(storage.put_if_unchanged("x", b"1", None))
        assert not storage.conditional_writes
        assert zarrckpt.load_pytree(url, storage_options=options) == {"v": 2}
        probes = [k for k in _s3_keys(s3_server, url.split("/")[2]) if "zarrckpt-probe" in k]
        assert probes == []  # the probe cleans up after itself
    finally:
        proxy.shutdown()


# --- requests, counted at the server -----------------------------------------------------------


def _server_requests(log: str, bucket: str, since: int) -> Counter:
    """Requests for ``bucket`` in moto's log after byte offset ``since``, by method."""
    time.sleep(0.05)  # moto logs right after it answers
    with open(log, "rb") as fh:
        fh.seek(since)
        lines = fh.read().decode(errors="replace").splitlines()
    # werkzeug colours non-2xx lines with ANSI escapes where its colour support is installed
    pattern = re.compile(
        rf'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|DELETE|HEAD) /{re.escape(bucket)}[/? ]'
    )
    return Counter(m.group(1) for line in lines if (m := pattern.search(line)))


def _mark(log: str) -> int:
    time.sleep(0.05)
    with open(log, "rb") as fh:
        return fh.seek(0, 2)


def test_request_budgets_counted_at_the_server(s3_server, s3_obstore_root):
    url, options = s3_obstore_root
    bucket = url.split("/")[2]
    state = {f"g{g}": {f"n{i}": np.full(64, i, np.float32) for i in range(50)} for g in range(4)}
    mark = _mark(s3_server.log)
    zarrckpt.save_pytree(url, state, storage_options=options, verbose=False)
    # Per leaf its zarr.json and its chunk; per step the lease, 4 groups, the step record and
    # the manifest (PUT); one manifest read; the lease's deletion; one listing (collection);
    # and once per bucket and process the probe of conditional writes (3 PUT, 1 delete).
    # obstore deletes through S3's bulk DeleteObjects (POST ?delete), one request too.
    assert _server_requests(s3_server.log, bucket, mark) == {
        "PUT": 1 + 2 * 200 + 4 + 1 + 1 + 3, "GET": 2, "POST": 1 + 1,
    }  # fmt: skip
    mark = _mark(s3_server.log)
    zarrckpt.save_pytree(url, state, storage_options=options, verbose=False)  # drops step 0
    assert _server_requests(s3_server.log, bucket, mark) == {
        "PUT": 1 + 2 * 200 + 4 + 1 + 1, "GET": 2 + 1, "POST": 1 + 1,  # + listing step 0
    }  # fmt: skip
    mark = _mark(s3_server.log)
    zarrckpt.load_pytree(url, storage_options=options)
    assert _server_requests(s3_server.log, bucket, mark) == {"GET": 200 + 2}  # no HEAD
    mark = _mark(s3_server.log)
    ckpt = zarrckpt.open_checkpoint(url, storage_options=options)
    assert _server_requests(s3_server.log, bucket, mark) == {"GET": 2}
    mark = _mark(s3_server.log)
    ckpt["g2/n27"][:]
    assert _server_requests(s3_server.log, bucket, mark) == {"GET": 1}
    mark = _mark(s3_server.log)
    assert zarrckpt.list_steps(url, storage_options=options) == [1]
    assert _server_requests(s3_server.log, bucket, mark) == {"GET": 1}


# --- errors and big objects ---------------------------------------------------------------------


def test_missing_bucket_is_a_store_error_naming_the_url(s3_server):
    url = "s3://no-such-bucket-zarrckpt/run"
    options = {**__import__("servers").s3_options(s3_server), "backend": "obstore"}
    with pytest.raises(StoreError, match=r"s3://no-such-bucket-zarrckpt/run/.* failed"):
        zarrckpt.save_pytree(url, {"w": np.ones(3)}, storage_options=options, verbose=False)
    with pytest.warns(zarrckpt.MissingCheckpointWarning):
        assert zarrckpt.load_pytree(url, storage_options=options) is None


def test_large_objects_go_in_parts(s3_obstore_root, monkeypatch):
    monkeypatch.setattr(ob, "_MULTIPART_BYTES", 6 * 1024 * 1024)
    monkeypatch.setattr(ob, "_PART_BYTES", 5 * 1024 * 1024)
    url, options = s3_obstore_root
    w = np.random.default_rng(0).standard_normal(3 * 1024 * 1024).astype(np.float32)  # 12 MiB
    zarrckpt.save_pytree(
        url, {"w": w}, storage_options=options, verbose=False, chunk_bytes=w.nbytes
    )
    np.testing.assert_array_equal(zarrckpt.load_pytree(url, storage_options=options)["w"], w)
    loaded = zarrckpt.load_pytree(url, storage_options={**options, "backend": "fsspec"})
    np.testing.assert_array_equal(loaded["w"], w)


def _load_in_fork(url, options, queue):
    try:
        queue.put(zarrckpt.load_pytree(url, storage_options=options)["w"].tolist())
    except Exception as exc:
        queue.put(repr(exc))


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX, imported by other tests
def test_a_forked_child_falls_back_to_fsspec(s3_root, monkeypatch):
    """obstore's Rust runtime does not survive fork(): a child of a process that used it
    would hang on its first request. It gets fsspec instead (or an error naming why)."""
    import multiprocessing

    monkeypatch.delenv("ZARRCKPT_STORAGE_BACKEND")
    url, options = s3_root
    zarrckpt.save_pytree(url, {"w": np.arange(3)}, storage_options=options, verbose=False)
    ctx = multiprocessing.get_context("fork")
    for extra, expected in (({}, [0, 1, 2]), ({"backend": "obstore"}, "survive fork()")):
        queue = ctx.Queue()
        child = ctx.Process(target=_load_in_fork, args=(url, {**options, **extra}, queue))
        child.start()
        try:
            got = queue.get(timeout=60)
        finally:
            child.kill()
            child.join()
        assert got == expected if isinstance(expected, list) else expected in got


def test_azure_urls_name_the_container_and_account():
    assert ob._split("az", "ctr/run/x") == ("ctr", "run/x", None)
    assert ob._split("abfs", "ctr@acc.dfs.core.windows.net/run") == ("ctr", "run", "acc")
    with pytest.raises(ob.Unsupported, match="no bucket"):
        ob._split("s3", "/run")


SHORT_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np, zarrckpt
    url, options = sys.argv[1], json.loads(sys.argv[2])
    zarrckpt.save_pytree(url, {"w": np.arange(4)}, storage_options=options, keep=None, verbose=False)
    print(zarrckpt.load_pytree(url, storage_options=options)["w"].sum())
    """
)


def test_a_short_script_exits_cleanly(s3_obstore_root):
    """Without a grace period at exit, ~20% of such scripts died by SIGABRT after their last
    line (obstore's Rust threads vs the interpreter's finalization, Python < 3.14)."""
    url, options = s3_obstore_root
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHORT_SCRIPT, f"{url}{i}", json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out.strip()) == (0, "6"), err[-2000:]


def test_without_obstore_fsspec_serves_and_asking_for_obstore_says_how(s3_root, monkeypatch):
    monkeypatch.delenv("ZARRCKPT_STORAGE_BACKEND")
    monkeypatch.setitem(sys.modules, "obstore", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "zarrckpt._storage.obstore")
    url, options = s3_root
    assert isinstance(open_storage(url, options), S3Storage)
    with pytest.raises(ImportError, match=r"pip install 'zarrckpt\[obstore\]'"):
        open_storage(url, {**options, "backend": "obstore"})
