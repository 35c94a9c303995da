"""Blob stores: where the DICOM files themselves live.

Two implementations behind one small protocol: ``FileBlobStore`` (a folder on local disk, each
write made durable with fsync before it returns) and ``S3BlobStore`` (MinIO, AWS S3, Ceph RGW, via
the ``minio`` client). Keys are relative paths such as ``<study>/<series>/<sop>.dcm``; the
archive derives them from UIDs, so they never contain anything but digits, dots and slashes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from storage.errors import BlobExists, StorageUnavailable


class MissingBucket(StorageUnavailable):
    """The S3 bucket a storage URL names does not exist (and was not to be made)."""

CHUNK_SIZE = 1 << 20


class StagedBlob(Protocol):
    """Data on its way into a store, before its key is known (see ``BlobStore.stage``)."""

    def commit(self, key: str, *, new: bool = False) -> None:
        """Make the data durable under ``key``; return only once it would survive a crash.
        ``new``: the key names these bytes only (the archive chose one not in use); a store
        that can tell raises ``BlobExists`` rather than replace what another process put
        there meanwhile."""

    def discard(self) -> None:
        """Drop the data (it was never acknowledged)."""


class BlobStore(Protocol):
    """What the archive needs from a place that keeps files."""

    # Whether each read is a network request (worth starting before it is needed).
    remote: bool

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` durably; return only once it would survive a crash."""

    def stage(self, data: bytes) -> StagedBlob:
        """Start storing ``data`` before its key is known: the slow part of ``put`` (for files,
        writing and fsyncing a temporary file) can then overlap with parsing the data.
        ``stage(data).commit(key)`` is ``put(key, data)``."""

    def get(self, key: str) -> bytes:
        """The whole blob (``KeyError`` if absent)."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the blob)."""

    def open_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The blob as a stream of chunks, for sending large files in bounded memory."""

    def size(self, key: str) -> int | None:
        """Size in bytes, or None if there is no such blob."""

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``."""

    def delete(self, key: str) -> None:
        """Remove the blob; absent keys are not an error."""

    def iterate(self, prefix: str = "",
                on_error: Callable[[str, str], None] | None = None) -> Iterator[str]:
        """All keys under ``prefix``, in byte-wise sorted order; parts that cannot be listed
        go to ``on_error(folder_key, reason)`` when given, else raise StorageUnavailable."""

    def describe(self) -> str:
        """Where the blobs are, for logs (no secrets)."""


def open_blob_store(url: str, *, create: bool = True) -> BlobStore:
    """The blob store for ``file:///path`` or ``s3://bucket?endpoint=...`` (see README);
    without ``create``, an S3 bucket that does not exist is ``MissingBucket``, not made."""
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        return FileBlobStore(Path(parts.path if parts.scheme else url))
    if parts.scheme == "s3":
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        endpoint = query.get("endpoint", "https://s3.amazonaws.com")
        endpoint_parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        secure = query.get("secure", "true" if endpoint_parts.scheme == "https" else "false")
        return S3BlobStore(
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            endpoint=endpoint_parts.netloc,
            access_key=query.get("access_key") or os.environ.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=query.get("secret_key") or os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            secure=secure.lower() in ("1", "true", "yes"),
            region=query.get("region"),
            create=create,
        )
    raise ValueError(f"storage URL scheme {parts.scheme!r} is not supported (use file:// or s3://)")


class FileBlobStore:
    """Blobs as files under one folder: temp file, fsync, rename, fsync of the folder."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)
        self._remove_stale_parts()
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def describe(self) -> str:
        return f"files in {self.root}"

    def _remove_stale_parts(self, older_than: float = 3600) -> None:
        """Delete temporary files a crash left behind (never acknowledged; an hour old, so a
        `pacs import` running beside the server keeps its files in progress)."""
        cutoff = time.time() - older_than
        for part in self._tmp.glob("*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()

    def path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        self.path(key)  # an invalid key fails before anything is written
        self.stage(data).commit(key)

    def stage(self, data: bytes) -> _StagedFile:
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, suffix=".part")
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise
        except OSError as exc:
            raise StorageUnavailable(f"cannot write to {self.root}: {exc.strerror}") from exc
        return _StagedFile(self, tmp_name)

    def _make_dirs(self, folder: Path) -> list[Path]:
        """Create ``folder`` and its missing parents under the root; the folders not yet known
        to be durable, deepest first. The caller fsyncs each one's parent once the blob is in
        place, then calls ``_known_durable``.

        Those fsyncs come after the blob's rename rather than after each ``mkdir``: nothing is
        acknowledged before they all return, and on a journalling file system the first one
        commits the new folders, the rename and the entries together, so the others find
        nothing left to write (a new study's first instance: one journal commit, not three).
        A folder that exists but is not known durable (another thread may have just made it,
        or the server just started) counts as new: its entry is fsynced too.
        """
        fresh = []
        current = folder
        while current != self.root and current not in self._known_dirs:
            fresh.append(current)
            current = current.parent
        for new_dir in reversed(fresh):
            with contextlib.suppress(FileExistsError):
                new_dir.mkdir()
        return fresh

    def _known_durable(self, folders: list[Path]) -> None:
        if not folders:
            return
        with self._dirs_lock:
            if len(self._known_dirs) > 100_000:
                self._known_dirs.clear()
            self._known_dirs.update(folders)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {key}: {exc.strerror}") from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with self.path(key).open("rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {key}: {exc.strerror}") from exc

    def open_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            f = self.path(key).open("rb")  # opened now, so a missing blob fails here
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {key}: {exc.strerror}") from exc
        return _read_chunks(f, chunk_size, key)

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # e.g. a folder on the way that cannot be searched
            raise StorageUnavailable(f"cannot read {key}: {exc.strerror}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # Drop empty series/study folders so the tree does not fill with empty directories.
        with contextlib.suppress(OSError):
            for folder in (path.parent, path.parent.parent):
                if folder == self.root:
                    break
                folder.rmdir()
                with self._dirs_lock:
                    self._known_dirs.discard(folder)

    def iterate(self, prefix: str = "",
                on_error: Callable[[str, str], None] | None = None) -> Iterator[str]:
        """Keys in byte-wise order. A folder that cannot be listed raises
        ``StorageUnavailable``, or, given ``on_error``, is passed to it (folder key, reason)
        and skipped, so one unreadable folder does not hide all the others."""
        start = self.path(prefix) if prefix else self.root
        yield from _walk_sorted(start, self.root, on_error)


class _StagedFile:
    """A temporary file, written and fsynced, waiting for its name."""

    def __init__(self, store: FileBlobStore, tmp_name: str) -> None:
        self.store = store
        self.tmp_name = tmp_name

    def commit(self, key: str, *, new: bool = False) -> None:
        target = self.store.path(key)
        try:
            fresh = self.store._make_dirs(target.parent)
            if new:
                self._link(target, key)
            else:
                os.replace(self.tmp_name, target)
            _fsync_dir(target.parent)
            for folder in fresh:  # deepest first: each new folder's entry in its parent
                _fsync_dir(folder.parent)
        except OSError as exc:
            self.discard()
            raise StorageUnavailable(
                f"cannot write {key} to {self.store.root}: {exc.strerror}") from exc
        self.store._known_durable(fresh)

    def _link(self, target: Path, key: str) -> None:
        """Give the file its name unless the name is taken (a rename would replace a file
        another process put there since the archive looked: two ``pacs`` processes storing
        one new instance, with other bytes, at once)."""
        try:
            os.link(self.tmp_name, target)
        except FileExistsError:
            self.discard()
            raise BlobExists(f"{key} was stored by another process meanwhile") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            os.replace(self.tmp_name, target)  # no hard links here (FAT, some shares)
            return
        self.discard()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp_name)


def _read_chunks(f, chunk_size: int, key: str) -> Iterator[bytes]:
    with f:
        try:
            while chunk := f.read(chunk_size):
                yield chunk
        except OSError as exc:  # a bad sector mid-file: the same error as failing to open it
            raise StorageUnavailable(f"cannot read {key}: {exc.strerror}") from exc


def _walk_sorted(folder: Path, root: Path,
                 on_error: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Keys of all files under ``folder``, sorted byte-wise like S3 listings."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        where = folder.relative_to(root).as_posix() + "/"
        if on_error is None:
            raise StorageUnavailable(f"cannot list {where}: {exc.strerror}") from exc
        on_error(where, exc.strerror or type(exc).__name__)
        return
    # Byte-wise key order: a file "a.dcm" and a folder "a" compare as "a.dcm" vs "a/...".
    keyed = sorted(((e.name + ("/" if e.is_dir() else ""), e) for e in entries),
                   key=lambda pair: pair[0])
    for name, entry in keyed:
        if entry.name == ".tmp" and folder == root:
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(Path(entry.path), root, on_error)
        elif not name.endswith(".part"):
            yield Path(entry.path).relative_to(root).as_posix()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _StagedObject:
    def __init__(self, store: S3BlobStore, data: bytes) -> None:
        self.store = store
        self.data = data

    def commit(self, key: str, *, new: bool = False) -> None:
        # S3 offers no put-if-absent through this client: the archive's keys for S3 name the
        # bytes (their hash), so a key written twice meanwhile holds the same bytes.
        self.store.put(key, self.data)

    def discard(self) -> None:
        self.data = b""


def _stream(response, chunk_size: int) -> Iterator[bytes]:
    try:
        yield from response.stream(chunk_size)
    finally:
        response.close()
        response.release_conn()


class S3BlobStore:
    """Blobs as objects in an S3 bucket (MinIO, AWS S3, Ceph RGW).

    A PUT is acknowledged by S3 only once the object is stored, which is the durability point.
    """

    remote = True

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool,
        prefix: str = "",
        region: str | None = None,
        create: bool = True,
    ) -> None:
        from minio import Minio
        from urllib3 import PoolManager, Retry, Timeout

        if not bucket:
            raise ValueError("the S3 storage URL needs a bucket: s3://BUCKET?endpoint=...")
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = endpoint
        http = PoolManager(
            num_pools=4,
            maxsize=64,
            timeout=Timeout(connect=10, read=120),
            retries=Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                            secure=secure, region=region, http_client=http)
        try:
            exists = self.client.bucket_exists(bucket)
            if not exists and create:
                self.client.make_bucket(bucket)
        except Exception as exc:
            raise StorageUnavailable(f"S3 bucket {bucket} at {endpoint} is not reachable: {exc}")\
                from exc
        if not exists and not create:
            raise MissingBucket(f"no S3 bucket {bucket} at {endpoint}")

    def describe(self) -> str:
        return f"S3 bucket {self.bucket} at {self.endpoint}"

    def _name(self, key: str) -> str:
        return self.prefix + key

    def put(self, key: str, data: bytes) -> None:
        import io

        try:
            self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data),
                                   content_type="application/dicom")
        except Exception as exc:
            raise StorageUnavailable(f"cannot write {key} to {self.describe()}: {exc}") from exc

    def stage(self, data: bytes) -> _StagedObject:
        return _StagedObject(self, data)  # S3 needs the key to start: nothing to do early

    def _response(self, key: str, offset: int = 0, length: int = 0):
        from minio.error import S3Error

        try:
            return self.client.get_object(self.bucket, self._name(key), offset=offset,
                                          length=length)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise KeyError(key) from None
            raise StorageUnavailable(f"cannot read {key} from {self.describe()}: {exc}") from exc
        except Exception as exc:
            raise StorageUnavailable(f"cannot read {key} from {self.describe()}: {exc}") from exc

    def get(self, key: str) -> bytes:
        response = self._response(key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        response = self._response(key, offset, length)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def open_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        response = self._response(key)  # requested now, so a missing blob fails here
        return _stream(response, chunk_size)

    def size(self, key: str) -> int | None:
        from minio.error import S3Error

        try:
            return self.client.stat_object(self.bucket, self._name(key)).size
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise StorageUnavailable(f"cannot stat {key} in {self.describe()}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._name(key))
        except Exception as exc:
            raise StorageUnavailable(f"cannot delete {key} from {self.describe()}: {exc}") \
                from exc

    def iterate(self, prefix: str = "",
                on_error: Callable[[str, str], None] | None = None) -> Iterator[str]:
        # ``on_error`` is never called: a listing is one request, which succeeds or raises.
        # S3 lists keys in UTF-8 byte order, which is what the reconciliation merge expects.
        for obj in self.client.list_objects(self.bucket, prefix=self._name(prefix),
                                            recursive=True):
            yield obj.object_name[len(self.prefix):]
