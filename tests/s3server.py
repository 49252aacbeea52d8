"""A real S3 server for the tests: moto's standalone server in a thread on 127.0.0.1, on a free port.

``tests/conftest.py`` exposes it as the session fixture ``s3_server`` (one server per test session) and the
function fixture ``s3_bucket`` (a fresh, empty bucket per test). Use it from any test::

    def test_x(s3_bucket):
        url = f"s3://{s3_bucket.bucket}/shards"
        s3_bucket.fs.put(str(local_dir), url, recursive=True)
        ShardDataset(url, storage_options=s3_bucket.storage_options)
        s3_bucket.fetched_bytes("shards/")  # bytes GET requests fetched, per key under that prefix

Nothing global is set: clients get the endpoint and the (fake) credentials from ``storage_options``; a test
that wants the standard AWS environment instead sets it with ``monkeypatch.setenv(**s3_bucket.env)``.
Requests are recorded (method, bucket-relative key, query string) so tests can count downloads.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "eu-west-1"  # s3fs sends it as the LocationConstraint, which us-east-1 must not have


class _Recorder:
    """WSGI middleware: remember each request's method, path, query string and Range header before moto
    answers it."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str, str]] = []

    def __call__(self, environ, start_response):
        with self.lock:
            self.requests.append(
                (
                    environ["REQUEST_METHOD"],
                    unquote(environ.get("PATH_INFO", "")),
                    environ.get("QUERY_STRING", ""),
                    environ.get("HTTP_RANGE", ""),
                )
            )
        return self.app(environ, start_response)


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>``, started by :meth:`start`, stopped by :meth:`stop`."""

    def __init__(self):
        self._recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", 0, self._recorder, threaded=True, request_handler=MotoRequestHandler
        )
        host, port = self._server.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def requests(self) -> list[tuple[str, str, str, str]]:
        with self._recorder.lock:
            return list(self._recorder.requests)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options reaching this server (no environment needed)."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": REGION},
        }

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment reaching this server (for ``monkeypatch.setenv``)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def filesystem(self):
        """A fresh (uncached) s3fs filesystem on this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


@dataclass
class S3Bucket:
    """One empty bucket on the session's server; ``fs`` is an s3fs filesystem for it."""

    server: S3Server
    bucket: str
    fs: Any = field(repr=False)
    _mark: int = 0

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.server.storage_options

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def requests(self) -> list[tuple[str, str, str, str]]:
        """(method, key, query, Range header) of the requests on this bucket since it was made (key relative
        to the bucket)."""
        out = []
        for method, path, query, rng in self.server.requests[self._mark :]:
            if path == f"/{self.bucket}" or path.startswith(f"/{self.bucket}/"):
                out.append((method, path[len(self.bucket) + 2 :], query, rng))
        return out

    def gets(self, prefix: str = "") -> list[tuple[str, str]]:
        """(key, Range header) of the GET requests on keys under ``prefix`` (listings excluded)."""
        return [(k, r) for m, k, _, r in self.requests() if m == "GET" and k and k.startswith(prefix)]

    def fetched_bytes(self, prefix: str = "") -> dict[str, int]:
        """Bytes GET requests asked for, per key under ``prefix`` (a GET without a Range counts the object's
        whole size)."""
        out: dict[str, int] = {}
        for key, rng in self.gets(prefix):
            if rng.startswith("bytes="):
                a, b = rng[6:].split("-")
                n = int(b) - int(a) + 1
            else:
                n = self.fs.size(f"{self.bucket}/{key}")
            out[key] = out.get(key, 0) + n
        return out


def new_bucket(server: S3Server) -> S3Bucket:
    name = f"kneeprep-{uuid.uuid4().hex[:12]}"
    fs = server.filesystem()
    mark = len(server.requests)
    fs.mkdir(name)
    return S3Bucket(server, name, fs, mark)
