"""The OpenAPI 3.1 description of the DICOMweb routes, served at ``/dicomweb/openapi.json``.

Written by hand from the route table in ``dicomweb.app``; a test checks that every route there
is described here, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

_UID = {"type": "string", "pattern": r"^[0-9.]{1,64}$"}
_JSON = "application/dicom+json"


def _path_params(path: str) -> list[dict[str, Any]]:
    names = {"study": "Study Instance UID", "series": "Series Instance UID",
             "instance": "SOP Instance UID", "frames": "Frame numbers, 1-based, comma-separated",
             "spec": "Bulk data reference, as given in a metadata BulkDataURI"}
    return [{"name": name, "in": "path", "required": True, "description": text,
             "schema": _UID if name in ("study", "series", "instance") else {"type": "string"}}
            for name, text in names.items() if "{" + name in path]


def _query(*names: str) -> list[dict[str, Any]]:
    described = {
        "limit": ("Maximum answers (default 1000, at most 5000)", {"type": "integer"}),
        "offset": ("Answers to skip", {"type": "integer"}),
        "fuzzymatching": ("true: person names match ignoring case and accents "
                          "(Vietnamese included)", {"type": "boolean"}),
        "includefield": ("Attributes to add to the answers: keyword or tag, repeated or "
                         "comma-separated; 'all' for every indexed attribute",
                         {"type": "string"}),
        "accept": ("Media type, overriding the Accept header (image/jpeg, image/png)",
                   {"type": "string"}),
        "quality": ("JPEG quality, 1-100", {"type": "integer"}),
        "window": ("center,width[,function]: the VOI window", {"type": "string"}),
        "viewport": ("columns,rows: the image is scaled to fit", {"type": "string"}),
    }
    return [{"name": name, "in": "query", "description": described[name][0],
             "schema": described[name][1]} for name in names]


def _search(level: str) -> dict[str, Any]:
    return {"get": {
        "summary": f"QIDO-RS: search {level}",
        "description": "Any attribute of PS3.18 Table 10.6.1-5, by keyword or tag "
                       "(PatientName=Nguy*, 00100020=BN001); wildcards * and ?, date/time ranges "
                       "A-B, UID lists separated by backslash or repeated.",
        "parameters": _query("limit", "offset", "fuzzymatching", "includefield"),
        "responses": {"200": {"description": "Matches", "content": {_JSON: {}}},
                      "204": {"description": "No match"},
                      "400": {"description": "A parameter is invalid (the message names it)"}},
    }}


def _retrieve(what: str) -> dict[str, Any]:
    one = what == "instance"  # single part application/dicom: one instance only
    content: dict[str, Any] = {"multipart/related": {}}
    if one:
        content["application/dicom"] = {}
    return {"get": {
        "summary": f"WADO-RS: retrieve the {what}",
        "description": 'multipart/related; type="application/dicom"; transfer-syntax=* '
                       "returns instances as stored; without transfer-syntax they are converted "
                       "to Explicit VR Little Endian; other lossless syntaxes on request."
                       + (" Accept: application/dicom (same parameters) returns the one "
                          "Part 10 file as the whole body." if one else ""),
        "responses": {"200": {"description": "The instances, streamed", "content": content},
                      "404": {"description": "Unknown UID"},
                      "406": {"description": "The transfer syntax cannot be produced"
                                             + ("" if one else ", or only application/dicom "
                                                "(one instance) was asked for")}},
    }, "delete": {
        "summary": f"Delete the {what}",
        "responses": {"204": {"description": "Deleted"}, "404": {"description": "Unknown UID"}},
    }}


def _simple(summary: str, media: str, *params: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": _query(*params),
                    "responses": {"200": {"description": "OK", "content": {media: {}}},
                                  "304": {"description": "Not modified (If-None-Match)"},
                                  "404": {"description": "Unknown UID"},
                                  "406": {"description": "Media type not available"}}}}


def _store() -> dict[str, Any]:
    return {"post": {
        "summary": "STOW-RS: store instances",
        "requestBody": {"content": {'multipart/related; type="application/dicom"': {}}},
        "responses": {"200": {"description": "All stored", "content": {_JSON: {}}},
                      "202": {"description": "Some failed or were duplicates"},
                      "409": {"description": "None stored (FailedSOPSequence says why)"},
                      "413": {"description": "Body larger than stow_max_bytes"},
                      "415": {"description": "Not multipart/related of application/dicom"}},
    }}


def openapi_document() -> dict[str, Any]:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    rendered = ("accept", "quality", "window", "viewport")
    paths: dict[str, dict[str, Any]] = {
        "/studies": {**_search("studies"), **_store()},
        "/series": _search("series"),
        "/instances": _search("instances"),
        study: {**_retrieve("study"), **_store()},
        study + "/series": _search("series of a study"),
        study + "/instances": _search("instances of a study"),
        series: _retrieve("series"),
        series + "/instances": _search("instances of a series"),
        instance: _retrieve("instance"),
        instance + "/frames/{frames}": _simple(
            "WADO-RS: frames (stored syntax with transfer-syntax=*, else uncompressed)",
            "multipart/related"),
        instance + "/bulkdata/{spec}": _simple(
            "WADO-RS: one bulk data value (single part honours Range)",
            "application/octet-stream"),
        "/wado": {"get": {"summary": "WADO-URI (requestType=WADO, studyUID, seriesUID, "
                                     "objectUID, contentType application/dicom or image/jpeg)",
                          "responses": {"200": {"description": "The object"}}}},
    }
    for base in (study, series, instance):
        paths[base + "/metadata"] = _simple("WADO-RS: metadata from the index (ETag, gzip)",
                                            _JSON)
        paths[base + "/rendered"] = _simple("WADO-RS: rendered image", "image/jpeg",
                                            *rendered)
        paths[base + "/thumbnail"] = _simple("Thumbnail of a representative image (cached)",
                                             "image/jpeg", *rendered)
    paths[instance + "/frames/{frames}/rendered"] = _simple("WADO-RS: rendered frames",
                                                            "image/jpeg", *rendered)
    paths[instance + "/frames/{frames}/thumbnail"] = _simple("Thumbnail of a frame",
                                                             "image/jpeg", *rendered)
    for path, item in paths.items():
        for operation in item.values():
            operation.setdefault("parameters", [])
            operation["parameters"] = _path_params(path) + operation["parameters"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "PACS DICOMweb", "version": "1",
                 "description": "DICOM PS3.18 services; see docs/conformance.md"},
        "servers": [{"url": "/dicomweb"}],
        "paths": paths,
    }
