"""Logging set-up shared by the main process and the DICOM worker processes."""

from __future__ import annotations

import contextvars
import logging
import warnings

# Set by ``dicomweb.errors.ContainErrors`` when it leaves an answer unfinished, having logged why:
# uvicorn's own line for it ("ASGI callable returned without completing response", at ERROR,
# with neither path nor cause) then says nothing more and is left out.
ANSWER_CUT_SHORT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pacs_answer_cut_short", default=False)
_UNFINISHED_ANSWER = "ASGI callable returned without completing response."


def _not_told_before(record: logging.LogRecord) -> bool:
    return not (record.msg == _UNFINISHED_ANSWER and ANSWER_CUT_SHORT.get())


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.error").addFilter(_not_told_before)
    # pynetdicom logs every association and message at INFO (and data sets at DEBUG, which
    # would put patient data in the log): keep it to warnings unless debugging.
    if level.upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # One line per Alembic plug-in.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        # fontTools.subset: ~25 lines per film PDF (fpdf2 subsets the embedded font);
        # openjpeg.encode: a line per tile of every JPEG 2000 it encodes.
        logging.getLogger("fontTools").setLevel(logging.WARNING)
        # fpdf2 warns of characters its font lacks, quoting them: from a film sheet's header,
        # that can be most of a patient's name (CJK, Thai...).
        logging.getLogger("fpdf").setLevel(logging.ERROR)
        # pydicom's codecs log a traceback at ERROR for each plugin that fails on corrupt pixel
        # data, then raise; the server answers that failure itself (406, 422, a refusal).
        logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL)
        # pydicom warns of each malformed value it reads, quoting it (a damaged header can
        # give a patient's name as a "UID"), as a log line and a Python warning; the archive
        # refuses such data itself, with reasons that quote no values.
        import pydicom.config  # noqa: F401 - which sets its logger to WARNING when imported

        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        logging.getLogger("openjpeg").setLevel(logging.WARNING)
