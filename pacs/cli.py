"""The ``pacs`` command: serve, import, check."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import os
import stat
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pacs import __version__
from pacs.settings import Settings, SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacs", description="PACS and paperless-film server")
    parser.add_argument("--version", action="version", version=f"pacs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM and HTTP servers")
    imp = commands.add_parser("import", help="store DICOM files from folders or files")
    imp.add_argument("paths", nargs="+", type=Path, help="files or folders (searched recursively)")
    imp.add_argument("--jobs", type=int, default=4, help="files stored in parallel (default 4)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    check = commands.add_parser("check", help="verify every index row against its blob")
    check.add_argument("--quick", action="store_true",
                       help="check existence and size only, not the SHA-256 of every file")
    commands.add_parser("migrate", help="create or upgrade the index database schema")
    ohif = commands.add_parser("install-ohif", help="fetch the OHIF Viewer (npm) for /ohif/")
    ohif.add_argument("--force", action="store_true", help="reinstall even if installed")
    ohif.add_argument("--tarball", type=Path, help="an @ohif/app .tgz already fetched "
                      "(npm pack), instead of running npm")
    share = commands.add_parser("share", help="create a share link (and QR code) for a study")
    share.add_argument("study_uid", help="Study Instance UID")
    share.add_argument("--days", type=float, help="days the link stays valid (default: "
                       "the share_days setting)")
    share.add_argument("--pin", help="4-8 digits, 'generated' or 'birth-year' (default: none)")
    share.add_argument("--download", action="store_true",
                       help="let the link download the images (DICOM and JPEG)")
    share.add_argument("--qr", type=Path, metavar="FILE.png|.svg", help="also write the QR code")
    for sub in (serve, imp, check, commands.choices["migrate"], ohif, share):
        sub.add_argument("--config", metavar="FILE", help="TOML settings file (PACS_* "
                         "environment variables override it)")

    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"pacs: {exc}", file=sys.stderr)
        return 2
    from pacs.logs import configure_logging

    configure_logging(settings.log_level if args.command == "serve" else "WARNING")
    command = {"serve": _serve, "import": _import, "check": _check, "migrate": _migrate,
               "install-ohif": _install_ohif, "share": _share}[args.command]
    try:
        return command(settings, args)
    except _StartupError as exc:
        print(f"pacs: {exc}", file=sys.stderr)
        return 2


class _StartupError(Exception):
    """The archive named by the settings cannot be opened; the message names the setting."""


def _open_archive(settings: Settings):
    """``archive_for(settings)``, with any failure to open the index or the blob store turned
    into a ``_StartupError`` naming the setting to fix (no traceback for a typo)."""
    from pacs.app import archive_for

    data_setting = "PACS_DATA_DIR (data_dir)"
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise _StartupError(f"{data_setting} {settings.data_dir}: is a file, not a folder")
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _StartupError(f"{data_setting} {settings.data_dir}: {_os_reason(exc)}") from None
    try:
        return archive_for(settings)
    except Exception as exc:  # noqa: BLE001 - classified below; the traceback helps no one
        raise _StartupError(f"{_failing_setting(settings, exc)}: {_short_reason(exc)}") from None


def _failing_setting(settings: Settings, exc: Exception) -> str:
    """Which setting most likely explains ``exc`` from opening the archive."""
    module = type(exc).__module__
    if module.startswith(("sqlalchemy", "alembic", "psycopg", "sqlite3")) or \
            isinstance(exc, ModuleNotFoundError):
        if settings.database_url:
            return "PACS_DATABASE_URL (database_url): cannot open the index database"
        return "PACS_DATA_DIR (data_dir): cannot open the index database index.sqlite"
    if settings.storage_url:
        return "PACS_STORAGE_URL (storage_url): cannot open the blob store"
    return "PACS_DATA_DIR (data_dir): cannot open the blob folder blobs/"


def _short_reason(exc: BaseException) -> str:
    """One line, without the SQLAlchemy background link or a URL's password."""
    if isinstance(exc, OSError):
        return _os_reason(exc)
    if isinstance(exc, ModuleNotFoundError):
        return f"the database driver {exc.name} is not installed"
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines() or [type(exc).__name__]
    return f"{type(original).__name__}: {lines[0][:300]}"


def _os_reason(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from pacs.app import CannotListen, PacsServer, check_listening_addresses

    try:
        check_listening_addresses(settings)
        PacsServer(settings).run()
    except CannotListen as exc:
        print(f"pacs: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # Taken between the check and the listener's start.
        print("pacs: a listening address (PACS_DICOM_PORT, PACS_HTTP_PORT or PACS_HL7_PORT) "
              "is in use (another pacs serve, or Orthanc?)", file=sys.stderr)
        return 2
    return 0


def _install_ohif(settings: Settings, args: argparse.Namespace) -> int:
    from viewer.ohif import OHIF_VERSION, OhifInstallError, install_ohif, installed_version

    target = settings.resolved_ohif_dir
    if installed_version(target) == OHIF_VERSION and not args.force:
        print(f"OHIF {OHIF_VERSION} is installed in {target}")
        return 0
    try:
        install_ohif(target, tarball=args.tarball)
    except OhifInstallError as exc:
        print(f"pacs install-ohif: {exc}", file=sys.stderr)
        return 1
    print(f"OHIF {OHIF_VERSION} installed in {target}; served at /ohif/")
    return 0


def _qr_target_problem(path: Path) -> str:
    """Why the QR code cannot be written to ``path``, or ''. Checked before the share is
    created: a share whose link was never shown is live and unusable."""
    if path.suffix.lower() not in (".png", ".svg"):
        return "the file name must end in .png or .svg"
    folder = path.parent
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if path.is_dir():
        return "is a folder"
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "cannot write there (permission denied)"
    return ""


def _share(settings: Settings, args: argparse.Namespace) -> int:
    import segno

    from pacs.access import server_secret
    from storage.errors import NotFound
    from storage.shares import ShareError, ShareStore
    from viewer.share_api import create_share, public_base

    if args.qr and (problem := _qr_target_problem(args.qr)):
        print(f"pacs share: --qr {args.qr}: {problem}; no share created", file=sys.stderr)
        return 2
    archive = _open_archive(settings)
    store = ShareStore(archive.index, server_secret(settings))
    try:
        made = create_share(store, settings, args.study_uid, days=args.days, pin=args.pin,
                            allow_download=args.download, created_by="cli",
                            base=public_base(settings))
    except (ShareError, NotFound) as exc:
        print(f"pacs share: {exc}", file=sys.stderr)
        return 1
    finally:
        archive.close()
    if args.qr:
        segno.make(made["url"], error="m").save(str(args.qr), scale=8, border=4)
    print(f"share {made['id']}: {made['url']}")
    print(f"  expires {made['expires_at']}; PIN: {made['pin_value'] or made['pin'] or 'none'}; "
          f"downloads {'allowed' if made['allow_download'] else 'not allowed'}")
    if not settings.public_url:
        print("  note: public_url is not set; the link uses the local HTTP address",
              file=sys.stderr)
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    _open_archive(settings).close()
    print("index schema is up to date")
    return 0


def _import_candidates(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    """Every file to import, with '' or the reason it was skipped before reading it.

    Folders are searched recursively, following symlinked sub-folders (a CD mounted and linked
    in is common) but never the same real folder twice, so a link back up cannot loop.
    Unreadable sub-folders are reported rather than skipped in silence."""
    seen: set[str] = set()
    for path in paths:
        if path.is_dir():
            yield from _folder_candidates(path, seen)
        else:
            yield path, ""


def _folder_candidates(folder: Path, seen: set[str]) -> Iterator[tuple[Path, str]]:
    errors: list[OSError] = []
    seen.add(os.path.realpath(folder))
    for root, dirs, names in os.walk(folder, onerror=errors.append, followlinks=True):
        yield from _folder_errors(errors)
        dirs.sort()
        for name in [d for d in dirs if _leads_back_up(Path(root) / d)]:
            dirs.remove(name)
            yield Path(root) / name, "a link to a folder above it, not followed (it would loop)"
        dirs[:] = [name for name in dirs if _first_visit(Path(root) / name, seen)]
        for name in sorted(names):
            yield Path(root) / name, ""
    yield from _folder_errors(errors)


def _leads_back_up(folder: Path) -> bool:
    """Whether ``folder`` is a symlink to itself or to one of the folders containing it."""
    if not folder.is_symlink():
        return False
    target = Path(os.path.realpath(folder))
    here = Path(os.path.realpath(folder.parent))
    return here == target or target in here.parents


def _first_visit(folder: Path, seen: set[str]) -> bool:
    """Whether ``folder`` (maybe a symlink) leads somewhere not searched yet; records it."""
    real = os.path.realpath(folder)
    if real in seen:
        return False
    seen.add(real)
    return True


def _folder_errors(errors: list[OSError]) -> Iterator[tuple[Path, str]]:
    for exc in errors:
        yield Path(exc.filename or "?"), f"cannot read the folder: {exc.strerror}"
    errors.clear()


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes; ``_NotRegular`` for a FIFO, socket or device.

    Opened non-blocking and checked with fstat on the open descriptor, so a FIFO cannot block
    the import and a file swapped for one after listing is still caught."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


class _NotRegular(Exception):
    """A directory entry that is not a regular file (FIFO, socket, device)."""


@dataclasses.dataclass
class _ImportTally:
    """What happened to each file of one ``pacs import``, for the summary."""

    total: int
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    rejected: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)

    def add(self, path: Path, outcome: str, reason: str) -> None:
        self.counts[outcome] += 1
        if outcome == "rejected":
            self.rejected.append((path, reason))
        elif outcome == "failed":
            self.failed.append((path, reason))

    def print_summary(self, interrupted: bool = False) -> None:
        done = sum(self.counts.values())
        c = self.counts
        print(f"{self.total} file(s): {c['stored']} stored, {c['duplicate']} duplicate "
              f"(already archived), {c['rejected']} rejected, {c['failed']} failed")
        if interrupted:
            print(f"interrupted: {self.total - done} file(s) not imported; run the same "
                  "command again to finish (stored files count as duplicates)")
        for path, reason in self.rejected:
            print(f"  rejected {path}: {reason}")
        for path, reason in self.failed:
            print(f"  FAILED {path}: {reason}")


def _store_file(archive, path: Path, skipped: str) -> tuple[Path, str, str]:
    """Store one file; any problem with it is an outcome for that file, never an abort."""
    from storage.errors import InvalidInstance, StorageUnavailable

    if skipped:
        return path, "rejected", skipped
    try:
        data = _read_regular_file(path)
    except _NotRegular:
        return path, "rejected", "not a regular file"
    except OSError as exc:
        return path, "rejected", f"cannot read the file: {exc.strerror}"
    try:
        result = archive.store(data)
    except InvalidInstance as exc:
        return path, "rejected", str(exc)
    except StorageUnavailable as exc:
        return path, "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - a parser bug on one file must not stop the rest
        # The exception's own message can quote bytes of the file (patient data): type only.
        return path, "rejected", (f"could not be read as DICOM (unexpected "
                                  f"{type(exc).__name__} in the parser)")
    return path, "duplicate" if result.is_warning else "stored", ""


def _finish_interrupted(pool: ThreadPoolExecutor, pending: collections.deque[Future],
                       tally: _ImportTally) -> None:
    """After Ctrl-C: drop queued files, let the ones being stored finish (each store is
    atomic) and count them, so the summary matches what is in the archive."""
    pool.shutdown(wait=True, cancel_futures=True)
    for future in pending:
        if future.done() and not future.cancelled():
            tally.add(*future.result())


def _import(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"pacs import: no such file or folder: {', '.join(map(str, missing))}",
              file=sys.stderr)
        return 2
    archive = _open_archive(settings)
    tally = _ImportTally(total=0)
    pool = ThreadPoolExecutor(max(1, args.jobs))
    pending: collections.deque[Future] = collections.deque()
    try:
        files = list(_import_candidates(args.paths))
        tally.total = len(files)
        pending.extend(pool.submit(_store_file, archive, path, skipped)
                       for path, skipped in files)
        with tqdm(total=len(files), unit="file", disable=args.no_progress or None,
                  file=sys.stderr) as bar:
            while pending:
                tally.add(*pending[0].result())
                pending.popleft()
                bar.update()
    except KeyboardInterrupt:
        _finish_interrupted(pool, pending, tally)
        archive.close()
        tally.print_summary(interrupted=True)
        return 130
    pool.shutdown()
    archive.close()
    tally.print_summary()
    return 1 if tally.failed else 0


def _missing_archive(settings: Settings) -> str:
    """Why there is no archive to check where the settings point, or '' if there is one.

    Opening the archive would create an empty one, which a check then reports clean: a
    mistyped data folder, database URL or bucket must fail instead. A PostgreSQL database
    holds an archive once its schema was made (Alembic's version table is there)."""
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        index = Path(url.removeprefix("sqlite:///"))
        setting = "PACS_DATABASE_URL" if settings.database_url else "PACS_DATA_DIR"
        if not index.is_file():
            return f"{setting}: no archive index at {index} (mistyped data folder?)"
    elif not _has_archive_schema(settings):
        return ("PACS_DATABASE_URL: the database holds no archive index (mistyped database, "
                "user or schema?)")
    blobs = settings.resolved_storage_url
    if blobs.startswith("file://") and not Path(blobs.removeprefix("file://")).is_dir():
        setting = "PACS_STORAGE_URL" if settings.storage_url else "PACS_DATA_DIR"
        return f"{setting}: no blob folder at {blobs.removeprefix('file://')}"
    if blobs.startswith("s3://"):
        from storage.blobs import MissingBucket, open_blob_store

        try:
            open_blob_store(blobs, create=False)
        except MissingBucket as exc:
            return f"PACS_STORAGE_URL: {exc} (mistyped bucket?)"
        except Exception as exc:  # noqa: BLE001 - unreachable: named as at start-up
            raise _StartupError(f"{_failing_setting(settings, exc)}: {_short_reason(exc)}"
                                ) from None
    return ""


def _has_archive_schema(settings: Settings) -> bool:
    """Whether the (PostgreSQL) index database has the archive's tables, without making them."""
    import sqlalchemy as sa

    from storage.index import create_engine

    try:
        engine = create_engine(settings.resolved_database_url, connections=2, name="pacs-check")
        try:
            return sa.inspect(engine).has_table("alembic_version")
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - unreachable, refused: named as at start-up
        raise _StartupError(f"{_failing_setting(settings, exc)}: {_short_reason(exc)}") from None


def _check(settings: Settings, args: argparse.Namespace) -> int:
    if problem := _missing_archive(settings):
        print(f"pacs check: {problem}; nothing checked", file=sys.stderr)
        return 2
    archive = _open_archive(settings)
    try:
        report = archive.check(verify_hashes=not args.quick)
    finally:
        archive.close()
    print(f"{report.instances} instance(s) checked: {len(report.missing)} missing blob(s), "
          f"{len(report.corrupt)} corrupt, {len(report.orphans)} orphan blob(s), "
          f"{len(report.unreadable)} unreadable")
    for uid in report.missing:
        print(f"  missing blob for instance {uid}")
    for uid in report.corrupt:
        print(f"  size or SHA-256 differs for instance {uid}")
    for where, reason in report.unreadable.items():
        what = f"blob folder {where}" if where.endswith("/") else f"blob of instance {where}"
        print(f"  cannot read the {what}: {reason}")
    for key in report.orphans:
        print(f"  orphan blob {key} (not in the index): {report.orphan_fates.get(key, '')}")
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
