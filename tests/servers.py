"""Local S3, GCS and Azure Blob servers (moto, gcp-storage-emulator, Azurite) on loopback,
for tests and benchmarks."""

import base64
import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from email.utils import formatdate
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(command: list[str], ready_path: str, log_path: str):
    """Start a server on a free loopback port and wait until it answers."""
    for _attempt in range(3):  # a port race is possible; retry with a new port
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(log_path, "ab")  # noqa: SIM115 - never an undrained PIPE: moto hangs after ~1,000 requests
        proc = subprocess.Popen([*command, str(port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + ready_path, timeout=1):
                    return proc, url, log
            except urllib.error.HTTPError:  # it answers (Azurite: 400 to a bare GET)
                return proc, url, log
            except OSError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
        log.close()
    raise RuntimeError(f"{command[0]} did not start; see {log_path}")


def stop(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def s3_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


def gcs_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "token": "anon", "project": "test"}


def start_s3(log_path: str, keep_alive: bool = False):
    """moto's S3 server. moto's own (werkzeug) closes the connection after every response;
    ``keep_alive`` serves the same app with waitress, which keeps connections open as S3 does,
    and logs one line per request like werkzeug (for counting at the server)."""
    if not keep_alive:
        code = "import sys; from moto.server import main; sys.exit(main(['-H', '127.0.0.1', '-p', sys.argv[1]]))"
        return serve([sys.executable, "-c", code], "/moto-api/", log_path)
    return serve(
        [sys.executable, str(Path(__file__).with_name("moto_keepalive.py"))], "/moto-api/", log_path
    )


def start_gcs(log_path: str):
    return serve([sys.executable, str(Path(__file__).with_name("gcs_emulator.py"))], "/", log_path)


# --- Azure Blob: Azurite (npm install azurite) ----------------------------------------------

#: Azurite's well-known development account (public, in Azurite's README)
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azurite_command() -> str | None:
    """``azurite-blob``: $AZURITE_BLOB, the repo's ``build/azurite`` (see .ci/run), or PATH."""
    for candidate in (
        os.environ.get("AZURITE_BLOB"),
        str(REPO / "build" / "azurite" / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def start_azurite(log_path: str, location: str):
    """Azurite's blob service; ``--disableTelemetry`` always (no traffic leaves the machine)."""
    command = azurite_command()
    if command is None:
        raise FileNotFoundError(
            "azurite-blob not found: npm install --prefix build/azurite azurite"
        )
    args = [command, "--blobHost", "127.0.0.1", "--location", location, "--silent",
            "--disableTelemetry", "--skipApiVersionCheck", "--blobPort"]  # fmt: skip
    return serve(args, "/", log_path)


def azure_endpoint(url: str) -> str:
    return f"{url}/{AZURE_ACCOUNT}"


def azure_options(url: str) -> dict:
    """adlfs-style storage_options for Azurite at ``url`` (zarrckpt maps them for obstore)."""
    return {
        "connection_string": f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};"
        f"AccountKey={AZURE_KEY};BlobEndpoint={azure_endpoint(url)};"
    }


def azure_request(url: str, method: str, path: str, query: dict | None = None) -> bytes:
    """One Blob REST call signed with the account key (SharedKey), e.g. to create a container."""
    query = dict(query or {})
    target = f"{azure_endpoint(url)}/{urllib.parse.quote(path)}"
    if query:
        target += "?" + urllib.parse.urlencode(query)
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    if method == "PUT":
        headers["Content-Type"] = "application/octet-stream"
    canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()) if k.startswith("x-ms-"))
    resource = f"/{AZURE_ACCOUNT}{urllib.parse.urlparse(target).path}"
    resource += "".join(f"\n{k.lower()}:{v}" for k, v in sorted(query.items()))
    fields = [method, "", "", "", "", headers.get("Content-Type", ""), "", "", "", "", "", ""]
    to_sign = "\n".join(fields) + "\n" + canonical + resource
    digest = hmac.new(base64.b64decode(AZURE_KEY), to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {AZURE_ACCOUNT}:{base64.b64encode(digest).decode()}"
    request = urllib.request.Request(target, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def azure_create_container(url: str, name: str) -> None:
    azure_request(url, "PUT", name, {"restype": "container"})


def azure_list(url: str, container: str, prefix: str = "") -> list[str]:
    """Every blob name under ``prefix``, raw, as the Blob service lists them."""
    import html
    import re

    names, marker = [], ""
    while True:
        query = {"restype": "container", "comp": "list", "prefix": prefix}
        if marker:
            query["marker"] = marker
        body = azure_request(url, "GET", container, query).decode()
        names += [html.unescape(n) for n in re.findall(r"<Name>(.*?)</Name>", body)]
        marker = html.unescape((re.findall(r"<NextMarker>(.*?)</NextMarker>", body) or [""])[0])
        if not marker:
            return names
