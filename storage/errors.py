"""Exceptions of the archive, one per kind of failure; front ends map them to statuses."""


class ArchiveError(Exception):
    """Base class of everything the archive raises on purpose."""


class InvalidInstance(ArchiveError):
    """The data offered for storage is not an instance we can archive (the reason says why)."""


class StorageUnavailable(ArchiveError):
    """The blob store or the index database failed; nothing was acknowledged."""


class BlobExists(StorageUnavailable):
    """A new blob's key was taken meanwhile, by another process storing the same instance:
    nothing of this store was kept (the sender sends again, and meets the stored copy)."""


class InvalidQuery(ArchiveError):
    """A query key has a value that cannot be matched (bad date range, unknown level...)."""

    def __init__(self, keyword: str, message: str) -> None:
        super().__init__(f"{keyword}: {message}")
        self.keyword = keyword


class NotFound(ArchiveError):
    """No study, series or instance with the given UID."""


class InstanceMismatch(InvalidInstance):
    """The data set's SOP Class or Instance UID differs from what the request announced, or
    its SOP Instance UID is archived already for another object (SOP class, study, series)."""


class PatientConflict(InvalidInstance):
    """The instance's Patient ID is not that of the patient its study is archived under."""
