"""The OHIF Viewer, installed from the npm package ``@ohif/app`` and served at ``/ohif/``.

``install_ohif`` fetches the pinned release with ``npm pack`` (the npm registry only), keeps its
``dist/`` minus the AI segmentation runtime (``ort/``) and the microscopy viewer, rewrites the
asset paths of a build made for ``/`` so it works under ``/ohif/``, and gzips the text assets
once so they are served compressed without work per request. It fails loudly when a pattern it
rewrites is missing, which is what an upgrade of OHIF would break first.

``app_config_js`` writes the viewer's configuration from the settings at each request: one
DICOMweb data source on the same origin, so no CORS is involved.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

OHIF_VERSION = "3.13.2"
BASE = "/ohif/"
LEFT_OUT = ("ort", "dicom-microscopy-viewer")
COMPRESSED_SUFFIXES = (".js", ".css", ".html", ".json", ".svg", ".wasm", ".mjs", ".map")
MARKER = ".pacs-ohif-version"


class OhifInstallError(RuntimeError):
    """The OHIF package could not be fetched or no longer looks as expected."""


def install_ohif(target: Path, *, version: str = OHIF_VERSION, tarball: Path | None = None
                 ) -> Path:
    """Install OHIF ``version`` into ``target`` (replaced atomically); returns ``target``."""
    target = target.resolve()
    with tempfile.TemporaryDirectory(prefix="ohif-") as work:
        work_dir = Path(work)
        if tarball is None:
            tarball = _npm_pack(version, work_dir)
        with tarfile.open(tarball) as archive:
            archive.extractall(work_dir / "x", filter="data")
        dist = work_dir / "x" / "package" / "dist"
        if not (dist / "index.html").exists():
            raise OhifInstallError(f"{tarball.name} has no dist/index.html")
        for name in LEFT_OUT:
            shutil.rmtree(dist / name, ignore_errors=True)
        (dist / "app-config.js").unlink(missing_ok=True)  # generated per request instead
        rewrite_for_base(dist)
        fold_study_list_filter(dist)
        _precompress(dist)
        (dist / MARKER).write_text(version)
        staging = target.with_name(target.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(dist, staging)
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    return target


def installed_version(target: Path) -> str | None:
    marker = target / MARKER
    return marker.read_text().strip() if marker.exists() else None


def _npm_pack(version: str, work_dir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise OhifInstallError("npm is needed to fetch the OHIF Viewer (apt-get install npm)")
    result = subprocess.run([npm, "pack", f"@ohif/app@{version}", "--pack-destination",
                             str(work_dir), "--silent"], capture_output=True, text=True,
                            timeout=600, check=False)
    tarballs = list(work_dir.glob("ohif-app-*.tgz"))
    if result.returncode != 0 or not tarballs:
        raise OhifInstallError(f"npm pack @ohif/app@{version} failed: "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")
    return tarballs[0]


# Each rewrite: files it applies to, pattern, replacement, how many files must contain it.
_REWRITES = [
    ("index.html", 'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{BASE}"'),
    ("index.html", 'href="/', f'href="{BASE}'),
    ("index.html", 'src="/', f'src="{BASE}'),
    ("manifest.json", '"src": "/', f'"src": "{BASE}'),
    ("*.css", "url(/", f"url({BASE}"),
    ("*.js", '__webpack_require__.p = "/"', f'__webpack_require__.p = "{BASE}"'),
]


# TanStack Table's default text filter, which OHIF's study list also applies in the browser to
# the answers of the (already accent-insensitive) QIDO search: "nguyen van" would hide
# "Nguyễn, Văn An" again. Ours folds case, accents, đ/Đ and the name separators first.
_INCLUDES_STRING_START = "const includesString = (row, columnId, filterValue) => {"
_INCLUDES_STRING_END = "includesString.autoRemove"
_FOLDING_INCLUDES_STRING = """const includesString = (row, columnId, filterValue) => {
  const fold = value => String(value).toLowerCase().normalize('NFD')
    .replace(/[\\u0300-\\u036f]/g, '').replace(/\\u0111/g, 'd')
    .replace(/[\\^,=]+/g, ' ').replace(/\\s+/g, ' ').trim();
  const value = row.getValue(columnId);
  if (value == null) return true;  // as TanStack's own
  if (filterValue == null) return false;
  return fold(value).includes(fold(filterValue));
};
"""


def fold_study_list_filter(dist: Path) -> None:
    """Make the study list's text filter accent-insensitive, like the server's matching."""
    for path in dist.glob("*.js"):
        text = path.read_text(encoding="utf-8")
        start = text.find(_INCLUDES_STRING_START)
        if start < 0:
            continue
        end = text.find(_INCLUDES_STRING_END, start)
        if end < 0:
            break
        path.write_text(text[:start] + _FOLDING_INCLUDES_STRING + text[end:], encoding="utf-8")
        return
    raise OhifInstallError("OHIF build changed: TanStack's includesString filter not found; "
                           "update viewer/ohif.py for this version")


def rewrite_for_base(dist: Path) -> None:
    """Point a build made for ``/`` at ``BASE`` (raises when an expected pattern is gone)."""
    for glob, old, new in _REWRITES:
        changed = 0
        for path in dist.glob(glob):
            text = path.read_text(encoding="utf-8")
            if old in text:
                path.write_text(text.replace(old, new), encoding="utf-8")
                changed += 1
        if not changed:
            raise OhifInstallError(f"OHIF build changed: no {glob} contains {old!r}; "
                                   "update viewer/ohif.py for this version")
    # Protect against the next version serving assets from "/" some new way.
    index = (dist / "index.html").read_text(encoding="utf-8")
    stray = re.findall(r'(?:src|href)="/(?!ohif/)[^"]*"', index)
    if stray:
        raise OhifInstallError(f"index.html still refers to the site root: {stray[:3]}")


def _precompress(dist: Path) -> None:
    for path in dist.rglob("*"):
        if path.is_file() and path.suffix in COMPRESSED_SUFFIXES and path.stat().st_size > 1024:
            data = path.read_bytes()
            packed = gzip.compress(data, compresslevel=9, mtime=0)
            if len(packed) < len(data) * 0.9:
                path.with_name(path.name + ".gz").write_bytes(packed)


def app_config_js(*, site_name: str) -> str:
    """``app-config.js``: the viewer pointed at this server's DICOMweb, same origin."""
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "pacs",
        "configuration": {
            "friendlyName": site_name,
            "name": "pacs",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "thumbnail",
            "thumbnailRequestStrategy": "fetch",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "supportsReject": False,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": BASE.rstrip("/"),
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "defaultDataSourceName": "pacs",
        "dataSources": [data_source],
        "customizationService": {"ohif.tours": {"$set": []}},
    }
    roots = ("qidoRoot", "wadoRoot", "wadoUriRoot")
    return (
        "/* Generated by the PACS server from its settings; do not edit. */\n"
        f"window.config = {json.dumps(config, ensure_ascii=False, indent=2)};\n"
        "(function () {\n"
        "  // Same origin as the viewer, whatever host name the browser used.\n"
        "  var c = window.config.dataSources[0].configuration;\n"
        + "".join(f"  c.{root} = window.location.origin + "
                  f"{json.dumps('/wado' if root == 'wadoUriRoot' else '/dicomweb')};\n"
                  for root in roots)
        + "})();\n"
    )
