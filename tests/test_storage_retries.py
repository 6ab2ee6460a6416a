"""One retry layer (issue 12): a transient S3 error is retried by ftdist's budget-bounded loop only,
so ``storage.retries: N`` means N retries — not N times botocore's retries times s3fs's. Checked
against a real HTTP server on loopback that answers 503 and counts the requests it receives."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ftdist import storage
from ftdist.config import StorageSection
from ftdist.errors import StorageUnavailable

UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
               b"<Message>try again</Message></Error>")


class FlakyS3:
    """Answers the first ``failures`` requests with 503 ServiceUnavailable, then serves ``body``."""

    def __init__(self, failures: int, body: bytes = b"payload") -> None:
        self.failures, self.body, self.requests = failures, body, 0
        self.methods: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self.do_GET(body=False)

            def do_GET(self, body: bool = True) -> None:  # noqa: N802
                outer.requests += 1
                outer.methods.append(self.command)
                if outer.requests <= outer.failures:
                    self.send_response(503)
                    payload = UNAVAILABLE
                    self.send_header("Content-Type", "application/xml")
                else:
                    self.send_response(200)
                    payload = outer.body
                    self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def flaky(request, monkeypatch) -> Iterator[FlakyS3]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = FlakyS3(request.param)
    yield server
    server.close()


def section(server: FlakyS3, retries: int) -> StorageSection:
    return StorageSection(endpoint_url=server.url, retries=retries, retry_budget_s=60)


@pytest.mark.parametrize("flaky", [1000], indirect=True)
def test_retries_means_that_many_retries_of_one_request(flaky):
    with pytest.raises(StorageUnavailable, match="after 2 retries"):
        storage.read_bytes("s3://bucket/key", section(flaky, retries=2))
    assert flaky.requests == 3  # the first try and 2 retries, nothing nested underneath


@pytest.mark.parametrize("flaky", [2], indirect=True)
def test_two_failures_need_two_retries_and_one_retry_is_not_enough(flaky):
    with pytest.raises(StorageUnavailable, match="after 1 retries"):
        storage.read_bytes("s3://bucket/key", section(flaky, retries=1))
    assert flaky.requests == 2  # nested layers would have retried underneath and read it
    flaky.requests = 0
    flaky.failures = 1  # the third request overall fails too; the fourth is answered
    assert storage.read_bytes("s3://bucket/key", section(flaky, retries=1)) == b"payload"
