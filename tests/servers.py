"""Local S3 and GCS servers (moto, gcp-storage-emulator) on loopback, for tests and benchmarks."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


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


def start_s3(log_path: str):
    code = "import sys; from moto.server import main; sys.exit(main(['-H', '127.0.0.1', '-p', sys.argv[1]]))"
    return serve([sys.executable, "-c", code], "/moto-api/", log_path)


def start_gcs(log_path: str):
    return serve([sys.executable, str(Path(__file__).with_name("gcs_emulator.py"))], "/", log_path)
