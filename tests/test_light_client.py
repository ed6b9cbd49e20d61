"""The light client (clients/python, `customdiff-client`) installed alone in a fresh virtualenv, no torch,
against a real stack (`customdiff serve` with a real tritonserver) over TLS and over mTLS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from customdiff.local import start_serve
from services.app import start_stack
from services.common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KEY = "key-light"

SCRIPT = """
import importlib.util, json, sys
from customdiff_client import CallError, Client, TLS
assert importlib.util.find_spec("torch") is None, "torch is installed"
address, ca, cert, key = sys.argv[1:5]
tls = TLS.from_files(ca=ca, cert=cert, key=key, server_name="localhost")
with Client.for_server(address, api_key="%s", tls=tls) as client:
    try:
        client.generate("a photo", num_images=-1)
        bad = None
    except CallError as e:
        bad = [e.status.name, e.reason, [v.field for v in e.field_violations], bool(e.request_id)]
    try:
        response = client.generate("a photo of a dog", seed=3, num_inference_steps=2, height=64, width=64)
        print(json.dumps({"bad": bad, "images": [len(i.png) for i in response.images],
                          "png": response.images[0].png[:8].hex(), "torch": "torch" in sys.modules}))
    except CallError as e:
        print(json.dumps({"error": e.status.name}))
""" % KEY


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, both signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, extension in (("server", "subjectAltName=DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                "-CAcreateserial", "-days", "1", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def light_python(tmp_path_factory) -> Path:
    """A fresh virtualenv with only `pip install clients/python` (grpcio, grpcio-status, protobuf)."""
    venv = tmp_path_factory.mktemp("light-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
                    "-c", str(ROOT / "deploy" / "docker" / "constraints.txt"), str(ROOT / "clients" / "python")],
                   check=True, capture_output=True)
    return python


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_base_dir, pki):
    """`customdiff serve` over TLS (all services, Triton) and a second inference server over mTLS on the same
    Triton and registry; yields their addresses."""
    directory = tmp_path_factory.mktemp("light-stack")
    tls = dict(tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"]))
    proc, ports = start_serve(directory, api_keys=f"{KEY}=light", base_model=str(tiny_base_dir), **tls)
    config = json.loads((directory / "config.yaml").read_text())
    mtls = start_stack(Settings.from_dict({**config, "inference_port": 0, "tls_client_ca_file": str(pki["ca.pem"])}),
                       components=("inference",), base_model=str(tiny_base_dir))
    try:
        yield f"localhost:{ports['inference']}", f"localhost:{mtls.ports['inference']}"
    finally:
        mtls.stop(0)
        proc.terminate()
        assert proc.wait(timeout=120) == 0


def run_light(python: Path, address: str, pki: dict[str, Path], client_cert: bool) -> dict:
    cert, key = (str(pki["client.pem"]), str(pki["client.key"])) if client_cert else ("", "")
    out = subprocess.run([str(python), "-c", SCRIPT, address, str(pki["ca.pem"]), cert, key],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_light_client_needs_no_torch_and_generates_over_tls(light_python, servers, pki):
    tls_address, _ = servers
    result = run_light(light_python, tls_address, pki, client_cert=False)
    assert result["torch"] is False
    assert result["bad"] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", ["num_images"], True]
    assert len(result["images"]) == 1 and result["png"] == "89504e470d0a1a0a"  # a PNG


def test_mtls_needs_the_client_certificate(light_python, servers, pki):
    _, mtls_address = servers
    result = run_light(light_python, mtls_address, pki, client_cert=True)
    assert len(result["images"]) == 1 and result["png"] == "89504e470d0a1a0a"
    assert run_light(light_python, mtls_address, pki, client_cert=False) == {"error": "UNAVAILABLE"}
