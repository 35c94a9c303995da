"""Blob stores: one contract, two implementations (local files and S3 over HTTP)."""

from __future__ import annotations

import os

import pytest

from storage.blobs import FileBlobStore, open_blob_store
from storage.errors import StorageUnavailable
from tests.conftest import s3_url


@pytest.fixture(params=["files", "s3"])
def store(request, tmp_path):
    if request.param == "files":
        return open_blob_store(f"file://{tmp_path / 'blobs'}")
    return open_blob_store(s3_url(request.getfixturevalue("s3_endpoint")))


def test_put_get_range_size_exists_delete(store):
    data = bytes(range(256)) * 100
    store.put("1.2.3/1.2.3.4/1.2.3.4.5.dcm", data)
    assert store.get("1.2.3/1.2.3.4/1.2.3.4.5.dcm") == data
    assert store.get_range("1.2.3/1.2.3.4/1.2.3.4.5.dcm", 1000, 300) == data[1000:1300]
    assert b"".join(store.open_chunks("1.2.3/1.2.3.4/1.2.3.4.5.dcm", 4096)) == data
    assert store.size("1.2.3/1.2.3.4/1.2.3.4.5.dcm") == len(data)
    assert store.exists("1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    store.delete("1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert not store.exists("1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert store.size("1.2.3/1.2.3.4/1.2.3.4.5.dcm") is None
    store.delete("1.2.3/1.2.3.4/1.2.3.4.5.dcm")  # absent: not an error


def test_missing_blob_raises_key_error(store):
    with pytest.raises(KeyError):
        store.get("9.9/9.9/9.9.dcm")
    with pytest.raises(KeyError):
        store.open_chunks("9.9/9.9/9.9.dcm")


def test_iterate_lists_keys_in_byte_order(store):
    keys = ["1.2/1.10/3.dcm", "1.2/1.9/1.dcm", "1.2/1.9/1.dcm.x", "1.3/1/2.dcm", "1.2.5/1/1.dcm"]
    for key in keys:
        store.put(key, b"x")
    assert list(store.iterate()) == sorted(keys)
    assert list(store.iterate("1.2/")) == sorted(k for k in keys if k.startswith("1.2/"))


def test_file_store_leaves_no_temporary_files_and_refuses_escaping_keys(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    store.put("1/2/3.dcm", b"abc")
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []
    with pytest.raises(ValueError):
        store.put("../outside.dcm", b"x")


def test_file_store_makes_the_blob_and_every_new_folder_durable_before_returning(
        tmp_path, monkeypatch):
    # A power cut cannot be staged in a test: record what is fsynced instead. The file's data
    # before its rename; after the rename, its folder, then each new folder's entry in its
    # parent, up to the root; a folder already made durable is not fsynced again.
    store = FileBlobStore(tmp_path / "blobs")
    root = store.root
    synced: list[tuple[str, bool]] = []  # (path, whether the blob had its final name)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, (root / "1.2/1.2.3/1.2.3.4.dcm").exists()))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.put("1.2/1.2.3/1.2.3.4.dcm", b"first")
    tmp_file, *folders = synced
    assert tmp_file[0].startswith(str(root / ".tmp")) and tmp_file[1] is False
    assert folders == [(str(root / "1.2/1.2.3"), True), (str(root / "1.2"), True),
                       (str(root), True)]

    synced.clear()
    store.put("1.2/1.2.3/1.2.3.5.dcm", b"second")  # same series: only its folder
    assert [path for path, _ in synced[1:]] == [str(root / "1.2/1.2.3")]
    synced.clear()
    store.put("1.2/1.2.9/1.2.9.1.dcm", b"third")  # new series of a known study
    assert [path for path, _ in synced[1:]] == [str(root / "1.2/1.2.9"), str(root / "1.2")]

    # A new store object (the server restarted) does not know the folders are durable.
    synced.clear()
    FileBlobStore(root).put("1.2/1.2.3/1.2.3.6.dcm", b"fourth")
    assert [path for path, _ in synced[1:]] == [str(root / "1.2/1.2.3"), str(root / "1.2"),
                                                str(root)]
    assert store.get("1.2/1.2.3/1.2.3.4.dcm") == b"first"


def test_file_store_write_failure_is_storage_unavailable(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    # The staging folder replaced by a file: every write fails, as on a broken disk.
    (tmp_path / "blobs" / ".tmp").rmdir()
    (tmp_path / "blobs" / ".tmp").write_bytes(b"")
    with pytest.raises(StorageUnavailable, match="cannot write"):
        store.put("1/2/4.dcm", b"x")
    assert not store.exists("1/2/4.dcm")


def test_unreachable_s3_endpoint_is_storage_unavailable():
    with pytest.raises(StorageUnavailable, match="not reachable"):
        open_blob_store("s3://bucket?endpoint=http://127.0.0.1:9&access_key=a&secret_key=b")


def test_file_store_blob_that_cannot_be_read_is_storage_unavailable_not_a_crash(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs" / "1.2").mkdir()
    (tmp_path / "blobs" / "1.2" / "3.dcm").symlink_to("3.dcm")  # ELOOP: not "no such file"

    with pytest.raises(StorageUnavailable, match="cannot read 1.2/3.dcm"):
        store.size("1.2/3.dcm")
    with pytest.raises(StorageUnavailable, match="cannot read 1.2/3.dcm"):
        store.open_chunks("1.2/3.dcm")
    assert store.size("1.2/4.dcm") is None


def test_file_store_iterate_reports_an_unlistable_folder_and_lists_the_rest(
        tmp_path, monkeypatch):
    store = FileBlobStore(tmp_path / "blobs")
    store.put("1/1.dcm", b"a")
    store.put("2/2.dcm", b"b")
    real_scandir = os.scandir

    def scandir(folder):
        if str(folder).endswith(os.sep + "1"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(folder)

    monkeypatch.setattr(os, "scandir", scandir)
    errors: list[tuple[str, str]] = []

    assert list(store.iterate(on_error=lambda *error: errors.append(error))) == ["2/2.dcm"]
    assert errors == [("1/", "Permission denied")]
    with pytest.raises(StorageUnavailable, match="cannot list 1/"):
        list(store.iterate())
