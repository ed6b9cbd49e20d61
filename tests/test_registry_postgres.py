"""The registry on both of its backends: SQLite (one replica) and PostgreSQL (production, many replicas).

Every behaviour test runs on both (the `url` fixture); the PostgreSQL cases are marked `postgres` and use
the session's embedded server (conftest.postgres_server) with a fresh database per test. Races between
replicas (threads and spawned processes, each with its own Registry on one URL) are tested on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from concepts.errors import NotFound
from services.common import registry as registry_module
from services.common.jobs import watch_job
from services.common.registry import MIGRATIONS, TERMINAL_STATES, Registry

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
CONCEPT = dict(digest="d" * 64, tokens=["<new1>"], class_words=["dog"], size_bytes=10,
               base_fingerprint="f" * 64, provenance={"kind": "training"})
SPAWN = multiprocessing.get_context("spawn")
WAIT_S = 60


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture()
def registry(url):
    reg = Registry(url)
    reg.migrate()
    yield reg
    reg.engine.dispose()


def _job(reg: Registry, tenant="tenant-a", kind="training", request_id="", name="dog", state="running") -> str:
    row, created = reg.create_job(tenant, kind, request_id, name, {"conceptName": name})
    assert created
    if state != "queued":
        reg.update_job(row.id, state=state)
    return row.id


def _upgrade(url: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


def _in_threads(n: int, call) -> list:
    """`call(i)` in `n` threads that start together; their results in order (an exception is re-raised)."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait(WAIT_S)
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


# Schema ------------------------------------------------------------------------------------------


def test_migrations_build_every_table_from_empty_and_are_idempotent(registry):
    registry.migrate()  # a second start finds the schema at head
    tables = set(sa.inspect(registry.engine).get_table_names())
    assert tables >= {"concepts", "jobs", "job_events", "blob_owners", "alembic_version"}
    with registry.engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["0004"]
    big = 5 * 1024**3  # sizes beyond 32 bits: a tenant's stored bytes, a large artifact
    registry.own_blobs("tenant-a", {"b" * 64: big})
    registry.add_concept("tenant-a", "dog", **dict(CONCEPT, size_bytes=big))
    assert registry.get_concept("tenant-a", "dog").size_bytes == big
    stored = registry.stored_bytes("tenant-a")
    assert stored == 2 * big and isinstance(stored, int)  # PostgreSQL's SUM(bigint) is a numeric
    assert registry.metric_counts().stored_bytes == {("tenant-a",): 2 * big}


def test_blob_owners_backfill_of_0002_from_jobs_recorded_before_it(url):
    _upgrade(url, "0001")
    engine = sa.create_engine(url)
    now = dt.datetime.now(dt.timezone.utc)
    text_columns = ("id", "tenant", "kind", "state", "request_id", "concept_name", "error_message", "work_dir")
    jobs = sa.table("jobs", *map(sa.column, text_columns + ("created_at", "updated_at")),
                    *(sa.column(c, sa.JSON) for c in ("request", "progress", "report")))
    one, two = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    request = {"concepts": [{"images": [one, two], "classImages": [one]}]}
    with engine.begin() as c:
        for i, (tenant, kind) in enumerate([("tenant-a", "training"), ("tenant-a", "training"),
                                            ("tenant-b", "training"), ("tenant-b", "merge")]):
            c.execute(jobs.insert().values(
                id=f"job{i}", tenant=tenant, kind=kind, state="succeeded", request_id="", concept_name="dog",
                request=request, progress={}, report={}, error_message="", work_dir="", created_at=now,
                updated_at=now))
    engine.dispose()
    reg = Registry(url)
    reg.migrate()
    for tenant in ("tenant-a", "tenant-b"):
        assert reg.owns_blob(tenant, "1" * 64) and reg.owns_blob(tenant, "2" * 64)
    assert not reg.owns_blob("tenant-c", "1" * 64) and reg.stored_bytes("tenant-a") == 0
    with reg.engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM blob_owners")).scalar() == 4  # deduplicated per tenant
    reg.engine.dispose()


# Concepts and blobs ------------------------------------------------------------------------------


def test_concept_versions_json_and_tenancy(registry):
    nested = {"ünïcode": "✓", "n": 3, "x": 0.5, "ok": True, "none": None, "list": [1, "2"]}
    provenance = {"kind": "import", "request_id": "r-1", "nested": nested}
    first = registry.add_concept("tenant-a", "dog", **CONCEPT)
    second = registry.add_concept("tenant-a", "dog", **dict(CONCEPT, tokens=["<new1>", "<new2>"],
                                                            provenance=provenance))
    assert (first.version, second.version) == (1, 2)
    latest = registry.get_concept("tenant-a", "dog")
    assert (latest.version, latest.tokens, latest.provenance) == (2, ["<new1>", "<new2>"], provenance)
    assert registry.get_concept("tenant-a", "dog", 1).tokens == ["<new1>"]
    assert registry.get_concept_by_id(second.id).provenance == provenance
    assert registry.concept_by_request_id("tenant-a", "dog", "r-1").id == second.id
    assert registry.concept_by_request_id("tenant-a", "dog", "r-2") is None
    for call in (lambda: registry.get_concept("tenant-b", "dog"),
                 lambda: registry.get_concept("tenant-a", "dog", 3),
                 lambda: registry.get_concept_by_id(10_000),
                 lambda: registry.delete_concepts("tenant-b", "dog")):
        with pytest.raises(NotFound):
            call()
    registry.add_concept("tenant-a", "cat", **dict(CONCEPT, digest="c" * 64))
    page = registry.list_concepts("tenant-a", offset=1, limit=2)
    assert [(c.name, c.version) for c in page] == [("dog", 1), ("dog", 2)]
    assert [c.name for c in registry.list_concepts("tenant-a", limit=1)] == ["cat"]
    assert registry.list_concepts("tenant-b") == []


def test_delete_concepts_reports_unreferenced_digests_and_unlinks_jobs(registry):
    job_id = _job(registry)
    row = registry.complete_job(job_id, dict(CONCEPT, digest="a" * 64))
    registry.add_concept("tenant-a", "dog", **dict(CONCEPT, digest="b" * 64))
    registry.add_concept("tenant-b", "dog", **dict(CONCEPT, digest="b" * 64))
    registry.own_blobs("tenant-a", {"a" * 64: 10})
    assert registry.get_job(job_id).concept_id == row.id
    rows, unreferenced = registry.delete_concepts("tenant-a", "dog")
    assert sorted(r.version for r in rows) == [1, 2]
    assert unreferenced == []  # a: still owned as a blob; b: tenant-b's concept
    assert registry.get_job(job_id).concept_id is None  # ON DELETE SET NULL
    _, unreferenced = registry.delete_concepts("tenant-b", "dog", 1)
    assert unreferenced == ["b" * 64]


def test_blob_ownership_and_metric_counts(registry):
    registry.own_blobs("tenant-a", {"a" * 64: 10, "b" * 64: 20})
    registry.own_blobs("tenant-a", {"a" * 64: 10})  # twice is once
    registry.own_blobs("tenant-b", {"a" * 64: 10})
    registry.add_concept("tenant-a", "dog", **dict(CONCEPT, digest="b" * 64, size_bytes=20))  # counted once
    assert registry.owns_blob("tenant-a", "b" * 64) and not registry.owns_blob("tenant-b", "b" * 64)
    assert registry.references_blob("b" * 64) and not registry.references_blob("c" * 64)
    assert [registry.stored_bytes(t) for t in ("tenant-a", "tenant-b", "tenant-c")] == [30, 10, 0]
    _job(registry, state="queued")
    _job(registry, kind="merge", state="failed")
    counts = registry.metric_counts()
    assert counts.jobs == {("training", "queued"): 1, ("merge", "failed"): 1}
    assert counts.concepts == {("tenant-a",): 1}
    assert counts.stored_bytes == {("tenant-a",): 30, ("tenant-b",): 10}


# Jobs --------------------------------------------------------------------------------------------


def test_job_lifecycle_events_and_terminal_states(registry):
    job_id = _job(registry, state="queued")
    registry.update_job(job_id, state="running", log_line="started", progress={"step": 1, "loss": 0.25})
    registry.update_job(job_id, log_line="step 2")
    registry.update_job(job_id, state="cancelled", log_line="cancelled by the user")
    late = registry.update_job(job_id, state="failed", log_line="late", error_message="boom")
    assert late.state == "cancelled"
    events = registry.events_after(job_id, 0)
    assert [(e.state, e.log_line) for e in events] == [
        ("queued", ""), ("running", "started"), ("running", "step 2"), ("cancelled", "cancelled by the user"),
        ("cancelled", "late")]  # the late line is kept, its state is not
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert registry.last_event_id(job_id) == events[-1].id
    assert registry.events_after(job_id, events[-1].id) == []
    row = registry.get_job(job_id, "tenant-a", "training")
    assert row.progress == {"step": 1, "loss": 0.25} and _aware(row.updated_at) >= _aware(row.created_at)
    assert registry.complete_job(job_id, dict(CONCEPT)) is None  # it ended: nothing registered
    assert registry.list_concepts("tenant-a") == []
    for tenant, kind in (("tenant-b", "training"), ("tenant-a", "merge")):
        with pytest.raises(NotFound):
            registry.get_job(job_id, tenant, kind)
    with pytest.raises(NotFound):
        registry.update_job("nope", state="running")


def test_job_listing_counts_and_request_ids(registry):
    first, created = registry.create_job("tenant-a", "training", "req-1", "dog", {"a": 1})
    again, created_again = registry.create_job("tenant-a", "training", "req-1", "dog", {"a": 2})
    assert created and not created_again and again.id == first.id and again.request == {"a": 1}
    # The key is per tenant and kind; jobs without one never collide (the partial unique index).
    for tenant, kind, request_id in (("tenant-b", "training", "req-1"), ("tenant-a", "merge", "req-1"),
                                     ("tenant-a", "training", ""), ("tenant-a", "training", "")):
        assert registry.create_job(tenant, kind, request_id, "dog", {})[1]
    # The widest values the services accept fit the columns (PostgreSQL enforces VARCHAR(n), SQLite does not).
    widest, _ = registry.create_job("t" * 128, "compress", "r" * 128, "n" * 128, {}, job_id=uuid.uuid4().hex)
    assert registry.get_job(widest.id).request_id == "r" * 128
    registry.update_job(first.id, state="running")
    assert [j.id for j in registry.list_jobs("tenant-a", "training")][0] == first.id
    assert len(registry.list_jobs("tenant-a", "training", offset=1, limit=5)) == 2
    assert [j.id for j in registry.list_jobs("tenant-a", "training", state="running")] == [first.id]
    assert registry.count_unfinished_jobs("tenant-a", ("training", "merge")) == 4
    registry.complete_job(first.id, dict(CONCEPT))
    assert registry.count_unfinished_jobs("tenant-a", ("training",)) == 2
    assert len(registry.unfinished_jobs("training")) == 3 and registry.get_job(first.id).state == "succeeded"
    assert len(registry.unfinished_jobs("compress")) == 1


def test_complete_job_registers_the_next_version_once(registry):
    jobs = [_job(registry) for _ in range(2)]
    rows = [registry.complete_job(job_id, dict(CONCEPT), log_line="done") for job_id in jobs]
    assert [r.version for r in rows] == [1, 2]
    assert registry.complete_job(jobs[0], dict(CONCEPT)) is None
    assert [(e.state, e.log_line) for e in registry.events_after(jobs[0], 0)][-1] == ("succeeded", "done")
    assert registry.get_job(jobs[1]).concept_id == rows[1].id


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


# Racing writers: threads on both backends, processes (replicas) on PostgreSQL --------------------


def _migrate_in_process(url: str, barrier) -> None:
    reg = Registry(url)
    barrier.wait(WAIT_S)
    reg.migrate()
    reg.engine.dispose()


def _in_processes(target, *args, n: int = 2) -> list:
    """`target(*args, barrier)` in `n` spawned processes that start together; their exit codes."""
    barrier = SPAWN.Barrier(n)
    procs = [SPAWN.Process(target=target, args=(*args, barrier)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WAIT_S)
    return [p.exitcode for p in procs]


@pytest.mark.postgres
def test_replicas_starting_together_migrate_an_empty_database_once(pg_url):
    # Alembic's `context` and `op` are process globals: replicas are processes, never threads of one.
    assert _in_processes(_migrate_in_process, pg_url) == [0, 0]
    reg = Registry(pg_url)
    assert reg.add_concept("tenant-a", "dog", **CONCEPT).version == 1
    reg.engine.dispose()


def test_request_id_twins_from_threads_get_one_job(url):
    registries = [Registry(url) for _ in range(2)]
    registries[0].migrate()
    results = _in_threads(8, lambda i: registries[i % 2].create_job("tenant-a", "training", "req-1", "dog", {}))
    assert sum(created for _, created in results) == 1 and len({row.id for row, _ in results}) == 1
    assert len(registries[0].list_jobs("tenant-a", "training")) == 1
    assert len(registries[0].events_after(results[0][0].id, 0)) == 1
    for reg in registries:
        reg.engine.dispose()


def test_jobs_of_one_concept_ending_together_are_all_registered(registry):
    jobs = [_job(registry) for _ in range(4)]
    rows = _in_threads(4, lambda i: registry.complete_job(jobs[i], dict(CONCEPT)))  # they race for the version
    assert sorted(r.version for r in rows) == [1, 2, 3, 4]
    assert {registry.get_job(j).state for j in jobs} == {"succeeded"}


@pytest.mark.postgres
def test_complete_job_exactly_once_from_threads(pg_url):
    reg = Registry(pg_url)
    reg.migrate()
    job_id = _job(reg)
    rows = _in_threads(6, lambda i: reg.complete_job(job_id, dict(CONCEPT)))
    assert [r.version for r in rows if r is not None] == [1]
    assert len(reg.list_concepts("tenant-a")) == 1
    assert [e.state for e in reg.events_after(job_id, 0)].count("succeeded") == 1
    reg.engine.dispose()


def _complete_in_process(url: str, job_id: str, barrier) -> None:
    reg = Registry(url)
    barrier.wait(WAIT_S)
    reg.complete_job(job_id, dict(CONCEPT))
    reg.engine.dispose()


@pytest.mark.postgres
def test_complete_job_exactly_once_from_two_processes(pg_url):
    reg = Registry(pg_url)
    reg.migrate()
    job_id = _job(reg)
    assert _in_processes(_complete_in_process, pg_url, job_id) == [0, 0]
    assert [c.version for c in reg.list_concepts("tenant-a")] == [1]
    assert [e.state for e in reg.events_after(job_id, 0)] == ["queued", "running", "succeeded"]
    reg.engine.dispose()


@pytest.mark.postgres
def test_a_late_terminal_state_never_overwrites_the_first(pg_url, monkeypatch):
    reg = Registry(pg_url)
    reg.migrate()
    job_id = _job(reg)
    real = registry_module.utcnow
    monkeypatch.setattr(registry_module, "utcnow", lambda: (time.sleep(0.3), real())[1])  # widens the race
    _in_threads(2, lambda i: reg.update_job(job_id, state=("cancelled", "failed")[i], log_line=str(i)))
    terminal = {e.state for e in reg.events_after(job_id, 0) if e.state in TERMINAL_STATES}
    assert terminal == {reg.get_job(job_id).state}  # the second writer's line is kept under the first state
    reg.engine.dispose()


def _write_lines_in_process(url: str, job_id: str, prefix: str, n: int) -> None:
    reg = Registry(url)
    for i in range(n):
        reg.update_job(job_id, log_line=f"{prefix}{i}")
    reg.engine.dispose()


class _ActiveContext:
    def is_active(self) -> bool:
        return True


def test_a_watcher_streams_the_events_up_to_the_end_when_the_job_ends_mid_batch(registry):
    job_id = _job(registry)
    stream = watch_job(registry, job_id, "tenant-a", "training", _ActiveContext())
    next(stream)
    registry.update_job(job_id, log_line="a")
    registry.update_job(job_id, log_line="b")
    assert next(stream)[1] == "a"  # the watcher read the batch [a, b]
    registry.update_job(job_id, log_line="c")
    registry.update_job(job_id, state="succeeded", log_line="done")  # before the watcher sent b
    assert [(row.state, line) for row, line in stream] == [("succeeded", "b"), ("succeeded", "c"),
                                                           ("succeeded", "done")]


def test_a_watcher_sees_every_event_of_concurrent_writers(url):
    """Threads of this process and another process write log lines to one job while a Watch streams it."""
    reg, writer = Registry(url), Registry(url)
    reg.migrate()
    job_id = _job(reg)
    stream = watch_job(reg, job_id, "tenant-a", "training", _ActiveContext())
    assert next(stream)[0].state == "running"  # the snapshot, taken before anyone writes
    seen: list[str] = []
    watcher = threading.Thread(target=lambda: seen.extend(line for _, line in stream))
    watcher.start()
    proc = SPAWN.Process(target=_write_lines_in_process, args=(url, job_id, "p", 30))
    proc.start()
    _in_threads(3, lambda t: [writer.update_job(job_id, log_line=f"t{t}-{i}") for i in range(15)])
    proc.join(WAIT_S)
    reg.update_job(job_id, state="succeeded", log_line="done")
    watcher.join(WAIT_S)
    assert proc.exitcode == 0 and not watcher.is_alive()
    written = [e.log_line for e in reg.events_after(job_id, 0)]
    expected = {f"p{i}" for i in range(30)} | {f"t{t}-{i}" for t in range(3) for i in range(15)} | {"done"}
    assert seen == written[2:]  # every event after the snapshot (queued, running), once, in order
    assert set(seen) == expected and len(seen) == len(expected)
    for r in (reg, writer):
        r.engine.dispose()


def test_leases_are_taken_at_creation_renewed_and_claimed_once_expired(registry):
    mine, _ = registry.create_job("tenant-a", "merge", "", "dog", {}, owner="r1", lease_s=0.5)
    never, _ = registry.create_job("tenant-a", "merge", "", "cat", {})  # from before leases
    done, _ = registry.create_job("tenant-a", "merge", "", "owl", {}, owner="r1", lease_s=0.5)
    registry.update_job(done.id, state="failed")
    assert (mine.owner, never.owner) == ("r1", None)
    assert registry.claim_jobs(("merge",), "r2", 30) == []  # r1's lease holds; nobody claims an unleased job
    assert registry.renew_leases(("merge",), "r1", 0.5) == {mine.id}  # its unfinished jobs only
    time.sleep(0.6)  # r1 stops renewing: it died
    assert [r.id for r in registry.claim_jobs(("merge",), "r2", 30)] == [mine.id]
    assert registry.claim_jobs(("merge",), "r3", 30) == []  # taken: r2's lease holds now
    assert registry.renew_leases(("merge",), "r1", 30) == set()  # r1, back from a pause, holds nothing
    assert registry.get_job(mine.id).owner == "r2"
    assert registry.events_after(mine.id, 0)[-1].log_line == \
        "replica r2 took the job over from replica r1, whose lease expired"
    # A starting replica takes its own jobs from before the restart and the unleased ones at once.
    assert {r.id for r in registry.claim_jobs(("merge",), "r2", 30, starting=True)} == {mine.id, never.id}
    assert registry.claim_jobs(("training",), "r2", 30, starting=True) == []  # other kinds are not its own
    registry.release_leases(("merge",), "r2")  # a clean stop: the others claim at once
    assert {r.id for r in registry.claim_jobs(("merge",), "r3", 30)} == {mine.id, never.id}


@pytest.mark.postgres
def test_replicas_claiming_together_take_disjoint_jobs(pg_url):
    registries = [Registry(pg_url) for _ in range(4)]
    registries[0].migrate()
    jobs = {registries[0].create_job("tenant-a", "merge", "", f"c{i}", {}, owner="dead", lease_s=0)[0].id
            for i in range(40)}
    time.sleep(0.01)
    claims = _in_threads(8, lambda i: registries[i % 4].claim_jobs(("merge",), f"r{i}", 30))
    taken = [row.id for rows in claims for row in rows]
    assert sorted(taken) == sorted(jobs)  # every job claimed, none twice
    for reg in registries:
        reg.engine.dispose()
