"""One driver per run folder (ftdist/run_lease.py, audit 2026-12-07 D14): a live driver's lease makes a
second driver refuse; a lease left by a driver that is gone is taken over; two drivers taking over at
once cannot both win; the lease is renewed while held and deleted on release. Local disk and S3 (moto).
The end-to-end refusals (`ftdist train` twice on one folder; S3) are in tests/test_storage_outage.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from ftdist import run_lease, storage
from ftdist.config import StorageSection
from ftdist.errors import UserError
from ftdist.uri import join_uri


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path, s3_server, s3_bucket) -> tuple[str, StorageSection]:
    if request.param == "local":
        return str(tmp_path / "runs" / "r"), StorageSection()
    return f"{s3_bucket}/runs/r", StorageSection(endpoint_url=s3_server.endpoint)


def _write(uri: str, st: StorageSection, **record) -> None:
    storage.write_text(join_uri(uri, ".ftdist-lease.json"), json.dumps(record), st)


def test_a_live_lease_refuses_a_second_driver_and_is_released(run_uri):
    uri, st = run_uri
    lease = run_lease.acquire(uri, st)
    try:
        with pytest.raises(UserError, match=r"is in use by another ftdist driver \(host .*, pid \d+\)"):
            run_lease.acquire(uri, st)
    finally:
        run_lease.release(lease)
    run_lease.release(run_lease.acquire(uri, st))  # free again after the release
    assert ".ftdist-lease.json" not in storage.listdir(uri, st)


def test_a_lease_on_another_host_is_held_until_it_expires(run_uri):
    uri, st = run_uri
    _write(uri, st, token="x", host="elsewhere", pid=1, expires_at=time.time() + 30)
    with pytest.raises(UserError, match="expires 45 s after its last renewal"):
        run_lease.acquire(uri, st)
    _write(uri, st, token="x", host="elsewhere", pid=1, expires_at=time.time() - 1)
    run_lease.release(run_lease.acquire(uri, st))


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(run_uri):
    uri, st = run_uri
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    _write(uri, st, token="x", host=socket.gethostname(), pid=int(dead.stdout), expires_at=time.time() + 30)
    run_lease.release(run_lease.acquire(uri, st))


def test_two_drivers_taking_over_a_stale_lease_at_once_cannot_both_win(run_uri):
    uri, st = run_uri
    _write(uri, st, token="x", host="elsewhere", pid=1, expires_at=time.time() - 1)
    stale = run_lease._read(join_uri(uri, ".ftdist-lease.json"), st)
    results: list[object] = []
    barrier = threading.Barrier(4)

    def take(i: int) -> None:
        barrier.wait()
        results.append(run_lease._put(join_uri(uri, ".ftdist-lease.json"), st, run_lease._record(f"t{i}", 45), stale))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not False for r in results) == 1, results


def test_the_lease_is_renewed_while_held(run_uri, monkeypatch):
    uri, st = run_uri
    monkeypatch.setattr(run_lease, "RENEW_S", 0.2)
    lease = run_lease.acquire(uri, st, ttl=5)
    try:
        first = run_lease._read(lease.uri, st).record["expires_at"]
        time.sleep(1.0)
        assert run_lease._read(lease.uri, st).record["expires_at"] > first
    finally:
        run_lease.release(lease)
