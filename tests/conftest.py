"""Shared fixtures: backends (SQLite/PostgreSQL, files/S3), a running server, the corpus."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from storage.archive import Archive, open_archive

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / ".corpus-cache" / "files"
FETCH = ROOT.parent / "shared" / "corpus" / "fetch.sh"
POSTGRES_ADMIN_URL = os.environ.get("PACS_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
OUTPUT = ROOT / "test-output"


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process: a port given to a
    peer that has not bound it yet was free again, and the next server was given it too (a
    storescp and a pacs serve on one port failed a test once)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
    raise RuntimeError("no loopback port left that was not handed out already")


# ------------------------------------------------------------------ corpus


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The public third-party corpus (fetched once into .corpus-cache)."""
    if not CORPUS.is_dir():
        if not FETCH.exists():
            pytest.fail(f"corpus missing: run `bash {FETCH} .corpus-cache`")
        subprocess.run(["bash", str(FETCH), str(ROOT / ".corpus-cache")], check=True)
    return CORPUS


def corpus_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("LICENSE")
                  and p.suffix not in (".txt", ".md", ".json", ".tsv"))


# ------------------------------------------------------------------ PostgreSQL


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A URL of a private schema in the local PostgreSQL ``test`` database, dropped after."""
    admin = sa.create_engine(POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"))
    schema = f"pacs_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is needed for these tests: {exc}")
    try:
        yield f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        # A server process the test stopped may still be ending its last transaction: the drop
        # can then lose a deadlock against it (seen once in CI). Try again, a few times.
        for attempt in range(5):
            try:
                with admin.begin() as conn:
                    conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
                break
            except sa.exc.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(1)
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private schema for the whole session (checks once that PostgreSQL is there)."""
    with postgres_schema() as url:
        yield url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL URL with an empty schema of its own, for one test."""
    with postgres_schema() as url:
        yield url


# ------------------------------------------------------------------ S3 (moto server)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server on loopback (moto's standalone server)."""
    port = free_port()
    OUTPUT.mkdir(exist_ok=True)
    log = open(OUTPUT / "moto.log", "wb")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(endpoint, timeout=1)
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto S3 server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(10)
    log.close()


def s3_url(endpoint: str, bucket: str | None = None) -> str:
    bucket = bucket or f"pacs-{uuid.uuid4().hex[:12]}"
    return f"s3://{bucket}?endpoint={endpoint}&access_key=test&secret_key=test&secure=false"


# ------------------------------------------------------------------ archives


@dataclass
class Backend:
    """Where an archive keeps its index and blobs."""

    name: str
    database_url: str
    storage_url: str

    def open(self, **kwargs) -> Archive:
        return open_archive(self.database_url, self.storage_url, **kwargs)


ALL_BACKENDS = ["sqlite-files", "sqlite-s3", "postgres-files", "postgres-s3"]


@pytest.fixture
def make_backend(request, tmp_path) -> callable:
    def make(name: str) -> Backend:
        database, blobs = name.split("-")
        if database == "sqlite":
            db_url = f"sqlite:///{tmp_path / 'index.sqlite'}"
        else:
            db_url = request.getfixturevalue("fresh_postgres_url")
            db_url = db_url.replace("postgresql://", "postgresql+psycopg://")
        if blobs == "files":
            storage_url = f"file://{tmp_path / 'blobs'}"
        else:
            storage_url = s3_url(request.getfixturevalue("s3_endpoint"))
        return Backend(name, db_url, storage_url)

    return make


@pytest.fixture(params=ALL_BACKENDS)
def backend(request, make_backend) -> Backend:
    return make_backend(request.param)


@pytest.fixture
def archive(backend: Backend) -> Iterator[Archive]:
    archive = backend.open()
    yield archive
    archive.close()


# ------------------------------------------------------------------ a running server


@dataclass
class PacsProcess:
    """``pacs serve`` in a subprocess, on free loopback ports."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    ae_title: str = "PACS"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    hl7_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def full_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PACS_DATA_DIR": str(self.data_dir),
            "PACS_AE_TITLE": self.ae_title,
            "PACS_DICOM_HOST": "127.0.0.1",
            "PACS_DICOM_PORT": str(self.dicom_port),
            "PACS_HTTP_HOST": "127.0.0.1",
            "PACS_HTTP_PORT": str(self.http_port),
            "PACS_HL7_HOST": "127.0.0.1",
            "PACS_HL7_PORT": str(self.hl7_port),
        })
        env.update(self.env)
        return env

    def start(self, wait: bool = True) -> PacsProcess:
        self.log_path = self.data_dir.parent / f"pacs-{self.dicom_port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - inherited by the child process
        self.proc = subprocess.Popen([sys.executable, "-m", "pacs.cli", "serve"],
                                     env=self.full_env(), stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pacs serve exited with {self.proc.returncode}:\n"
                                   + self.log())
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(self.http + "/healthz", timeout=2)
                body = response.json()
                if response.status_code == 200 and body["reconcile"] in ("done", "disabled"):
                    return body
            time.sleep(0.1)
        raise RuntimeError("pacs serve did not become ready:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def set_share_time(self, share_id: int, column: str, moment: dt.datetime) -> None:
        """Move a share's ``created_at`` or ``expires_at`` in this server's SQLite index
        (shares last at least an hour, and a test cannot wait for one to expire)."""
        with sqlite3.connect(self.data_dir / "index.sqlite", timeout=30) as db:
            db.execute(f"UPDATE shares SET {column} = ? WHERE pk = ?",
                       (moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f"), share_id))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture
def start_server(tmp_path) -> Iterator[callable]:
    started: list[PacsProcess] = []

    def start(data_dir: Path | None = None, **env: str) -> PacsProcess:
        server = PacsProcess(data_dir or tmp_path / "pacs-data", env=env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def stow(base: str, datas: list[bytes], headers: dict[str, str] | None = None
         ) -> httpx.Response:
    """STOW-RS ``datas`` to ``base`` + ``/dicomweb/studies`` in one request."""
    body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + d + b"\r\n"
                    for d in datas) + b"--b--\r\n"
    return httpx.post(base + "/dicomweb/studies", content=body, timeout=60, headers={
        **(headers or {}),
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})


# ------------------------------------------------------------------ a headless browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Non-black pixels of the largest canvas, and a hash of them (to see the slice change).
CANVAS_PIXELS = """() => {
  const canvases = [...document.querySelectorAll('canvas')].filter(c => c.width > 100);
  if (!canvases.length) return null;
  const c = canvases.sort((a, b) => b.width * b.height - a.width * a.height)[0];
  const t = document.createElement('canvas'); t.width = c.width; t.height = c.height;
  const x = t.getContext('2d'); x.drawImage(c, 0, 0);
  const d = x.getImageData(0, 0, t.width, t.height).data; let n = 0, h = 0;
  for (let i = 0; i < d.length; i += 16) {
    if (d[i] > 10 || d[i + 1] > 10 || d[i + 2] > 10) n++;
    h = (h * 31 + d[i]) | 0;
  }
  return [n, h];
}"""


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, driven by Playwright (a fresh profile per context)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is needed (apt-get install chromium; scripts/test.sh does it)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: Nagle off, as tuned modalities run."""
    if shutil.which("storescu") is None:
        pytest.fail("DCMTK is needed (apt-get install dcmtk)")
    return {**os.environ, "TCP_NODELAY": "1"}
