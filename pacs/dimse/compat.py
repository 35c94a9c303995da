"""The pynetdicom release our patches of its internals were written against.

``reactor``, ``commands`` and ``passthrough`` replace a few pynetdicom functions; each checks
here first, so upgrading pynetdicom means reviewing them and then widening this one tuple.
"""

from __future__ import annotations

import logging

import pynetdicom

log = logging.getLogger("pacs.dimse")

SUPPORTED_VERSIONS = ("3.0.",)


def pynetdicom_supported(patch: str, consequence: str) -> bool:
    """Whether the installed pynetdicom is one ``patch`` was written for (else log why not)."""
    if pynetdicom.__version__.startswith(SUPPORTED_VERSIONS):
        return True
    log.warning("pynetdicom %s: %s not installed (written for %s); %s",
                pynetdicom.__version__, patch, SUPPORTED_VERSIONS, consequence)
    return False
