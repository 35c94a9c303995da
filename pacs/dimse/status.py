"""DIMSE status codes this server returns (PS3.7 Annex C, PS3.4 B.2.3, C.4)."""

SUCCESS = 0x0000
PENDING = 0xFF00
# Matches continue, but an optional key given a value was not matched on (PS3.4 C.4.1.1.4).
PENDING_KEYS_NOT_SUPPORTED = 0xFF01
CANCEL = 0xFE00

# General (PS3.7 C)
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
DUPLICATE_SOP_INSTANCE = 0x0111
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121

# Storage (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Failure (in PS3.4's "cannot understand" range, so not retried) documented by this server: the
# instance's Patient ID is not its study's (storage.errors.PatientConflict).
PATIENT_CONFLICT = 0xC001
# Warning sent when the SOP Instance UID is already archived. PS3.4 has no dedicated code; this
# server documents 0xB007 for it in its conformance statement: the instance is safe (the stored
# copy is kept, or replaced by policy) and a warning, unlike a failure, stops modalities retrying.
WARNING_DUPLICATE_SOP_INSTANCE = 0xB007

# Query/Retrieve (PS3.4 C.4)
QR_OUT_OF_RESOURCES = 0xA700
QR_IDENTIFIER_DOES_NOT_MATCH = 0xA900
QR_UNABLE_TO_PROCESS = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPERATION_FAILED = 0xA702

# ErrorComment is LO: at most 64 characters.
ERROR_COMMENT_LIMIT = 64
