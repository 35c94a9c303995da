"""The ``pacs`` command: serve, import, check."""

from __future__ import annotations

import argparse
import collections
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    return {"serve": _serve, "import": _import, "check": _check, "migrate": _migrate,
            "install-ohif": _install_ohif, "share": _share}[args.command](settings, args)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from pacs.app import PacsServer

    PacsServer(settings).run()
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


def _share(settings: Settings, args: argparse.Namespace) -> int:
    import segno

    from pacs.access import server_secret
    from pacs.app import archive_for
    from storage.errors import NotFound
    from storage.shares import ShareError, ShareStore
    from viewer.share_api import create_share, public_base

    archive = archive_for(settings)
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
    from pacs.app import archive_for

    archive_for(settings).close()
    print("index schema is up to date")
    return 0


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    yield Path(root) / name
        else:
            yield path


def _import(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pacs.app import archive_for
    from storage.errors import InvalidInstance, StorageUnavailable

    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"pacs import: no such file or folder: {', '.join(map(str, missing))}",
              file=sys.stderr)
        return 2
    archive = archive_for(settings)
    files = list(_files(args.paths))
    counts: collections.Counter[str] = collections.Counter()
    rejected: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []

    def store(path: Path) -> tuple[Path, str, str]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return path, "rejected", f"cannot read the file: {exc.strerror}"
        try:
            result = archive.store(data)
        except InvalidInstance as exc:
            return path, "rejected", str(exc)
        except StorageUnavailable as exc:
            return path, "failed", str(exc)
        return path, "duplicate" if result.is_warning else "stored", ""

    with ThreadPoolExecutor(max(1, args.jobs)) as pool, tqdm(
            total=len(files), unit="file", disable=args.no_progress or None,
            file=sys.stderr) as bar:
        for path, outcome, reason in pool.map(store, files):
            counts[outcome] += 1
            if outcome == "rejected":
                rejected.append((path, reason))
            elif outcome == "failed":
                failed.append((path, reason))
            bar.update()
    archive.close()
    print(f"{len(files)} file(s): {counts['stored']} stored, {counts['duplicate']} duplicate "
          f"(already archived), {counts['rejected']} rejected, {counts['failed']} failed")
    for path, reason in rejected:
        print(f"  rejected {path}: {reason}")
    for path, reason in failed:
        print(f"  FAILED {path}: {reason}")
    return 1 if failed else 0


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from pacs.app import archive_for

    archive = archive_for(settings)
    report = archive.check(verify_hashes=not args.quick)
    archive.close()
    print(f"{report.instances} instance(s) checked: {len(report.missing)} missing blob(s), "
          f"{len(report.corrupt)} corrupt, {len(report.orphans)} orphan blob(s)")
    for uid in report.missing:
        print(f"  missing blob for instance {uid}")
    for uid in report.corrupt:
        print(f"  size or SHA-256 differs for instance {uid}")
    for key in report.orphans:
        print(f"  orphan blob {key} (not in the index; `pacs serve` re-indexes it at start-up)")
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
