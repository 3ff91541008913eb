"""Real servers for tests, started on 127.0.0.1 and stopped by the test: PostgreSQL (Debian's
`postgresql` package: initdb + pg_ctl on a throwaway data folder), an S3-compatible server (moto's,
from PyPI) and an MLflow server on a given backend store and artifact destination."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from unittest import mock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed: apt-get install postgresql (make test does it as root)")
    return Path(found[-1]).parent


@contextmanager
def postgres(database: str = "mlflow"):
    """A PostgreSQL server of its own (trust auth, loopback only); yields its SQLAlchemy URI. As root
    it runs as the `postgres` user (PostgreSQL refuses root)."""
    bindir, port = postgres_bin(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="acpo-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    data = folder / "data"
    run = lambda *command: subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", database)
        yield f"postgresql://mlflow@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def postgres_database(uri: str, name: str) -> str:
    """A new database `name` on the server of the SQLAlchemy `uri`; returns its URI."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return uri.rsplit("/", 1)[0] + f"/{name}"


def database_text(uri: str) -> str:
    """Every row of every table of the database at `uri`, as text (to search for what must not be stored)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    with engine.connect() as connection:
        tables = sqlalchemy.inspect(connection).get_table_names()
        text = "\n".join(repr(row) for table in tables for row in connection.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')))
    engine.dispose()
    return text


@contextmanager
def mlflow_server(backend_store: str, artifacts: str | Path):
    """`mlflow server` on a free loopback port, its artifacts in a folder or object storage (s3://...,
    through boto3 and the AWS_* variables); yields its URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store,
                               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow server on {backend_store.split('@')[-1]} exited with {server.returncode}")
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not answer within 120 s")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


S3_BUCKET = "acpo"


@contextmanager
def s3_server():
    """moto's S3 server in its own process on a free loopback port, with a bucket `acpo`. While it runs,
    the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) point every client at it:
    pyarrow, Ray's storage, boto3 (MLflow), and processes started meanwhile. Yields `s3://acpo`."""
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        with mock.patch.dict(os.environ, settings):  # restored afterwards
            for _ in range(120):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError(f"moto's S3 server exited with {server.returncode}")
                    time.sleep(0.25)
            boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
            yield f"s3://{S3_BUCKET}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def s3_keys(prefix: str = "") -> list[str]:
    """Every object's key in the test bucket under `prefix` (the server of `s3_server`)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


class Proxy:
    """A TCP forwarder on a loopback port to `target` (host, port): the address clients are given, so a
    test can take a server off the network without stopping it (`stop`: the listener and every open
    connection closed, connections refused) and bring it back on the same port (`start`)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> "Proxy":
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            for s in self.connections:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.connections = []
