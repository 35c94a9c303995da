"""One settings object: built-in defaults, then a TOML file, then ``PACS_*`` environment variables.

Every field can be set in the TOML file under its own name (``dicom_port = 104``) and from the
environment as ``PACS_`` plus the upper-cased name (``PACS_DICOM_PORT=104``). The environment wins,
so a container or a systemd unit can override a shared file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "PACS_"
DUPLICATE_POLICIES = ("keep", "replace")
NAME_MATCHING_MODES = ("auto", "fuzzy", "exact")
# Fewest index connections a process of the server gets: several requests run at once in each.
MIN_PROCESS_CONNECTIONS = 4
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash
# One film_sheets_per_study entry: a Modality (CS: letters, digits, underscore) or "*", sheets.
_FILM_SHEETS_ENTRY = re.compile(r"\s*(\*|[A-Za-z0-9_]{1,16})\s*:\s*(\d+)\s*")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class SettingsError(ValueError):
    """A setting has a value the server cannot run with."""


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity this server may connect to (C-MOVE destination, commitment)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AETITLE@host:port`` (IPv6 hosts in brackets: ``AE@[::1]:104``)."""
        match = re.fullmatch(r"\s*([^@]+)@(\[[^\]]+\]|[^:]+):(\d+)\s*", text)
        if not match:
            raise SettingsError(f"peer {text!r} is not of the form AETITLE@host:port")
        ae_title, host = match.group(1).strip(), match.group(2).strip("[]").strip()
        port = int(match.group(3))
        _check_ae_title(ae_title, "peer AE title")
        if not host:
            raise SettingsError(f"peer {text!r} has a blank host")
        if not 0 < port < 65536:
            raise SettingsError(f"peer {text!r}: port {port} is out of range")
        return cls(ae_title, host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start-up. Defaults run with no file and no environment."""

    data_dir: Path = Path("./pacs-data")
    ae_title: str = "PACS"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    http_host: str = "127.0.0.1"
    http_port: int = 8042
    # Empty means: SQLite file / blob folder inside data_dir.
    database_url: str = ""
    storage_url: str = ""
    # Most connections one `pacs serve` opens to a PostgreSQL index, all its processes together
    # (the main process gets half, the DICOM workers share the rest, each process at least
    # MIN_PROCESS_CONNECTIONS): keep the sum over all nodes below the database server's
    # max_connections (100 by default). SQLite ignores it.
    database_connections: int = 40
    # C-MOVE destinations and Storage Commitment requesters we may call back.
    peers: tuple[Peer, ...] = ()
    # Calling AE titles allowed to associate; empty allows any.
    allowed_calling_aes: tuple[str, ...] = ()
    # Reject associations whose called AE title is not ours.
    require_called_ae_title: bool = False
    # Store SOP classes this server does not know as storage classes (private ones, newer ones).
    accept_unknown_sop_classes: bool = False
    # Same SOP Instance UID stored again: keep the first copy or replace it (both warn).
    duplicate_policy: str = "keep"
    # An instance whose Patient ID is not that of its study's patient (nor the one the study
    # arrived with) is refused; true files it under the study's patient, with a warning.
    accept_conflicting_patient_id: bool = False
    # PN matching in C-FIND/QIDO: "auto" folds case and accents when the query has no
    # diacritics (so "nguyen van an" finds "Nguyễn^Văn An"), "fuzzy" always folds,
    # "exact" is case-insensitive but accent-sensitive.
    person_name_matching: str = "auto"
    # Re-index blobs that have no index row (left by a crash) when the server starts.
    reconcile_on_start: bool = True
    # Parallel DICOM associations accepted at once (by each DICOM worker process).
    max_associations: int = 32
    # Processes that serve DICOM associations, sharing the one listening port: parallel
    # associations (several modalities, a C-STORE while a C-MOVE runs) then use every core.
    # 0: one per core, at most 4; 1: the DICOM server runs inside the main process.
    dicom_workers: int = 0
    # Seconds an association may be idle (no PDU) before it is aborted.
    dicom_network_timeout: float = 60.0
    # Largest PDU we accept: bigger PDUs mean fewer round trips through the network code.
    dicom_max_pdu: int = 262144
    # Address clients use to reach the HTTP side, e.g. "https://pacs.hospital.vn" behind a
    # reverse proxy; used in the absolute URLs of answers (RetrieveURL, BulkDataURI). Empty:
    # taken from each request's Host header.
    public_url: str = ""
    # Browser origins allowed to call /dicomweb from other sites (CORS), e.g.
    # "https://viewer.example.org", written as browsers send Origin (lower case, no trailing
    # slash, no default port); "*" allows any. Empty: same origin only.
    cors_allowed_origins: tuple[str, ...] = ()
    # Largest STOW-RS request body in bytes (HTTP 413 beyond it).
    stow_max_bytes: int = 4 * 1024**3
    # Seconds a request body may stop arriving before the request is answered 408 and its
    # connection closed (a client that announces a large upload and sends nothing would hold a
    # connection, and its request's resources, for ever).
    http_body_idle_timeout: float = 60.0
    # Hospital or site name shown on pages and in the viewer.
    site_name: str = "PACS"
    # Where `pacs install-ohif` puts the OHIF Viewer; empty: .ohif next to the source tree.
    ohif_dir: str = ""
    # Key that signs share sessions and derives share tokens; empty: a random key kept in
    # data_dir/secret.key (created on first start). Several nodes must share one key.
    secret_key: str = ""
    # Clients that get full access without credentials, until user authentication exists:
    # the hospital's own networks (CIDR). Everyone else reaches only what a share link opens.
    staff_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto headers are believed.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Share links: default lifetime, how long one opening stays signed in, PIN attempts.
    share_days: int = 30
    share_session_hours: int = 12
    share_pin_max_attempts: int = 5
    # A study is complete when no instance arrived for this many seconds.
    study_complete_seconds: float = 120.0
    # Create a share link automatically when a study is complete (its slip can be printed
    # from /admin or the API, and the EMR gets the link), with this PIN kind ("", "generated"
    # or "birth-year") and with or without downloads.
    share_on_complete: bool = False
    share_on_complete_pin: str = ""
    share_on_complete_download: bool = False
    # Film sheets: columns x rows per sheet, images per series when there are no key images.
    film_layout: str = "4x5"
    film_images_per_series: int = 20
    # Savings estimate: price of one printed film sheet (VND) and sheets a printed study took,
    # per modality ("*" for the others).
    film_sheet_price_vnd: int = 60000
    film_sheets_per_study: tuple[str, ...] = ("CT:2", "MR:2", "PT:2", "MG:2", "CR:1",
                                              "DX:1", "US:1", "XA:1", "RF:1", "*:1")
    # EMR links (emr/). HL7 v2 orders and ADT arrive over MLLP on this port (0: no listener).
    hl7_host: str = "0.0.0.0"
    hl7_port: int = 2575
    # HL7 connections open at once (a HIS keeps one or two); beyond, new ones are closed.
    hl7_max_connections: int = 64
    # MSH-3 / MSH-4 of the messages this server sends (ACKs, ORU results).
    hl7_application: str = "PACS"
    hl7_facility: str = ""
    # Where results go when a study is complete: "mllp://HOST:PORT" (HL7 ORU^R01) and/or a
    # FHIR R4 base URL "http(s)://HOST/fhir" (ImagingStudy, PUT by id).
    emr_results_to: tuple[str, ...] = ()
    # Retries of undelivered results: first wait, doubling up to the maximum (seconds).
    emr_retry_seconds: float = 5.0
    emr_retry_max_seconds: float = 300.0
    # FHIR identifier system of the hospital's MRNs (Patient.identifier of type MR).
    emr_mrn_system: str = "urn:pacs:mrn"
    log_level: str = "INFO"

    @property
    def resolved_database_url(self) -> str:
        """SQLAlchemy URL of the index database (``postgresql://`` is mapped to psycopg 3)."""
        url = self.database_url or f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @property
    def resolved_dicom_workers(self) -> int:
        """Number of DICOM worker processes (1: the DICOM server runs in the main process)."""
        if self.dicom_workers:
            return self.dicom_workers
        return max(1, min(4, len(os.sched_getaffinity(0))))

    def trusted_proxy_networks(self) -> list[str]:
        """``trusted_proxies`` as networks in their one spelling (10.0.0.5/24 is 10.0.0.0/24),
        which is how uvicorn needs them: it reads a network with host bits as no network."""
        return [str(ipaddress.ip_network(proxy, strict=False)) for proxy in self.trusted_proxies]

    def database_connection_shares(self) -> tuple[int, int]:
        """(main process, each DICOM worker process): how ``database_connections`` is split.
        Each process gets at least ``MIN_PROCESS_CONNECTIONS``."""
        workers = self.resolved_dicom_workers
        if workers <= 1:
            return max(MIN_PROCESS_CONNECTIONS, self.database_connections), 0
        per_worker = max(MIN_PROCESS_CONNECTIONS, self.database_connections // (2 * workers))
        main = max(MIN_PROCESS_CONNECTIONS, self.database_connections - workers * per_worker)
        return main, per_worker

    @property
    def resolved_storage_url(self) -> str:
        """Blob store URL: ``file:///path`` or ``s3://bucket?endpoint=...``."""
        return self.storage_url or f"file://{(self.data_dir / 'blobs').resolve()}"

    @property
    def resolved_ohif_dir(self) -> Path:
        """Folder of the installed OHIF build served at /ohif/."""
        if self.ohif_dir:
            return Path(self.ohif_dir).resolve()
        return (Path(__file__).resolve().parents[1] / ".ohif").resolve()

    @property
    def film_grid(self) -> tuple[int, int]:
        """(columns, rows) of a film sheet."""
        columns, rows = self.film_layout.lower().split("x")
        return int(columns), int(rows)

    @property
    def film_sheets(self) -> dict[str, int]:
        """Modality -> film sheets a printed study of it took ("*": any other)."""
        return dict(_film_sheets_entry(item) for item in self.film_sheets_per_study)

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this AE title (compared without padding), if any."""
        wanted = ae_title.strip()
        return next((p for p in self.peers if p.ae_title == wanted), None)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, an optional TOML file and the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        path = Path(config_file)
        try:
            with path.open("rb") as f:
                values.update(tomllib.load(f))
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {path} is not valid UTF-8 TOML: {exc}") from None
        except OSError as exc:  # a folder, no permission: PACS_CONFIG points at the wrong thing
            raise SettingsError(f"config file {path} (PACS_CONFIG / --config) cannot be read: "
                                f"{exc.strerror}") from None
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingsError(f"unknown setting(s) in {config_file}: {', '.join(unknown)}")
    for name in known:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = env_value
    converted = {name: _convert(name, known[name].type, value) for name, value in values.items()}
    settings = dataclasses.replace(Settings(), **converted)
    _validate(settings)
    return settings


def _convert(name: str, type_name: Any, value: Any) -> Any:
    """Turn a TOML value or an environment string into the field's type.

    TOML values must already have the right type: 104.9 or true for a port is a mistake to
    report, not a value to round."""
    try:
        _check_toml_type(type_name, value)
        if type_name in ("Path", Path):
            return Path(str(value))
        if type_name in ("int", int):
            return int(value)
        if type_name in ("float", float):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"{value!r} is not a finite number")
            return number
        if type_name in ("bool", bool):
            return _to_bool(value)
        if type_name == "tuple[Peer, ...]":
            return tuple(Peer.parse(p) for p in _to_list(value))
        if type_name == "tuple[str, ...]":
            return tuple(_to_list(value))
        return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: {exc}") from None


_TOML_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "Path": (str,),
}


def _check_toml_type(type_name: Any, value: Any) -> None:
    """Refuse a TOML value of the wrong type (strings come from the environment: parsed)."""
    name = getattr(type_name, "__name__", type_name)
    if str(name).startswith("tuple["):
        # A list, or one string of comma-separated entries as in the environment; anything
        # else (104, a table) would become a string no one wrote.
        if not isinstance(value, (str, list)):
            raise TypeError(f"{value!r} is a TOML {_toml_kind(value)}, expected a list of "
                            "strings")
        for item in value if isinstance(value, list) else ():
            if not isinstance(item, str):
                raise TypeError(f"entry {item!r} is a TOML {_toml_kind(item)}, expected a "
                                "string (in quotes)")
        return
    expected = _TOML_TYPES.get(name)
    if expected is None or isinstance(value, str):
        return
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        raise TypeError(f"{value!r} is a TOML {_toml_kind(value)}, expected {name}")


def _toml_kind(value: Any) -> str:
    """The TOML name of a parsed value's kind (a table, not a dict)."""
    return {dict: "table", list: "array"}.get(type(value), type(value).__name__)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _to_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _check_ae_title(value: str, what: str) -> None:
    if not _AE_TITLE.match(value) or not value.strip():
        raise SettingsError(f"{what} {value!r} is not a valid AE title (1-16 characters, no '\\')")


def _film_sheets_entry(item: str) -> tuple[str, int]:
    """One ``film_sheets_per_study`` entry ``MODALITY:SHEETS`` as (MODALITY, sheets)."""
    match = _FILM_SHEETS_ENTRY.fullmatch(item)
    if not match:
        raise SettingsError(f"film_sheets_per_study: {item!r} is not MODALITY:SHEETS, e.g. CT:2")
    sheets = int(match.group(2))
    if sheets < 1:
        raise SettingsError(f"film_sheets_per_study: {item!r}: sheets must be at least 1")
    return match.group(1).upper(), sheets


def _check_cors_origin(origin: str) -> None:
    """``*``, or an origin written exactly as browsers send ``Origin``: CORSMiddleware
    compares the strings as they are, so any other spelling never matches."""
    if origin == "*":
        return
    what = f"cors_allowed_origins: {origin!r}"
    not_an_origin = SettingsError(f"{what} is not an origin http(s)://host[:port] (or *)")
    try:
        parts = urlsplit(origin)
        port, host = parts.port, parts.hostname or ""
    except ValueError:  # a port out of range, a broken [IPv6]
        raise not_an_origin from None
    if parts.scheme not in ("http", "https") or port == 0 or \
            not re.fullmatch(r"[a-z0-9.-]+|[0-9a-f:.]+", host):  # no "*.", no blank
        raise not_an_origin
    if parts.path == "/" and not (parts.query or parts.fragment or parts.username):
        raise SettingsError(f"{what} ends in '/': browsers send the origin without it")
    if parts.path or parts.query or parts.fragment or parts.username:
        raise SettingsError(f"{what} has more than scheme://host[:port] (a path, a query "
                            "or a user)")
    written = f"[{host}]" if ":" in host else host
    if port and port != _DEFAULT_PORTS[parts.scheme]:
        written += f":{port}"
    as_sent = f"{parts.scheme}://{written}"
    if origin != as_sent:  # upper case, a default port
        raise SettingsError(f"{what} never matches: browsers send {as_sent!r}")


def _check_emr_destination(destination: str) -> None:
    """``mllp://HOST:PORT`` or an http(s) FHIR base URL, told apart and read as
    ``emr.service`` does (``mllp://`` prefix; ``urlsplit``; PUT to ``BASE/ImagingStudy/ID``)."""
    what = f"emr_results_to: {destination!r}"
    mllp = destination.startswith("mllp://")
    try:
        parts = urlsplit(destination)
        port = parts.port
    except ValueError:  # a port out of range or not a number, a broken [IPv6]
        raise SettingsError(f"{what} has a bad port (1-65535) or host") from None
    if (not mllp and parts.scheme not in ("http", "https")) or not parts.hostname or \
            re.search(r"\s", destination):
        raise SettingsError(f"{what} is neither mllp://HOST:PORT nor a FHIR base URL "
                            "http(s)://...")
    if mllp and port is None:
        raise SettingsError(f"{what} has no port: mllp://HOST:PORT")
    if port == 0:
        raise SettingsError(f"{what} has a bad port (1-65535) or host")
    if parts.username is not None:
        raise SettingsError(f"{what}: a user or password in the URL is not sent; leave it out")
    extra = "?" in destination or "#" in destination
    if mllp and (extra or parts.path not in ("", "/")):
        raise SettingsError(f"{what}: nothing may follow mllp://HOST:PORT")
    if extra:
        raise SettingsError(f"{what}: results are PUT to BASE/ImagingStudy/ID; leave out the "
                            "query or fragment")


def _validate_lists(settings: Settings) -> None:
    """Entries of the list settings that are read only later (CORS, results, film)."""
    seen_peers: set[str] = set()
    for peer in settings.peers:
        if peer.ae_title in seen_peers:  # ``Settings.peer`` would never find the second
            raise SettingsError(f"peers: AE title {peer.ae_title!r} is listed twice")
        seen_peers.add(peer.ae_title)
    for origin in settings.cors_allowed_origins:
        _check_cors_origin(origin)
    for destination in settings.emr_results_to:
        _check_emr_destination(destination)
    seen_modalities: set[str] = set()
    for item in settings.film_sheets_per_study:
        modality, _ = _film_sheets_entry(item)
        if modality in seen_modalities:  # the dict would keep the last, silently
            raise SettingsError(f"film_sheets_per_study: {modality} is listed twice")
        seen_modalities.add(modality)


def _validate_ports_and_limits(settings: Settings) -> None:
    """Ports 1-65535 (hl7_port 0: no listener, as documented); positive timeouts and PDU;
    a log level logging knows; public_url an http(s) URL."""
    for name in ("dicom_port", "http_port", "hl7_port"):
        port = getattr(settings, name)
        lowest = 0 if name == "hl7_port" else 1
        if not lowest <= port < 65536:
            raise SettingsError(f"{name} {port} is out of range {lowest}-65535")
    if settings.dicom_network_timeout <= 0:
        raise SettingsError("dicom_network_timeout must be a positive number of seconds")
    if settings.dicom_max_pdu < 0:
        raise SettingsError("dicom_max_pdu must not be negative (0: no limit)")
    if settings.film_sheet_price_vnd < 0:
        raise SettingsError("film_sheet_price_vnd must not be negative")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SettingsError(f"log_level {settings.log_level!r} must be DEBUG, INFO, WARNING, "
                            "ERROR or CRITICAL")
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        try:
            port = parts.port
        except ValueError:  # out of range, not a number
            port = 0
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
            raise SettingsError(f"public_url {settings.public_url!r} must be an http(s) URL, "
                                "e.g. https://pacs.hospital.vn")
        if parts.query or parts.fragment or parts.username is not None or \
                "?" in settings.public_url or "#" in settings.public_url:
            # Links are made by appending paths: /s/TOKEN would land inside the query.
            raise SettingsError(f"public_url {settings.public_url!r}: links are made by "
                                "appending paths to it; leave out the query, fragment or user")


def _validate(settings: Settings) -> None:
    _check_ae_title(settings.ae_title, "ae_title")
    for ae in settings.allowed_calling_aes:
        _check_ae_title(ae, "allowed_calling_aes entry")
    _validate_ports_and_limits(settings)
    _validate_lists(settings)
    if settings.duplicate_policy not in DUPLICATE_POLICIES:
        raise SettingsError(
            f"duplicate_policy {settings.duplicate_policy!r} must be one of {DUPLICATE_POLICIES}"
        )
    if settings.person_name_matching not in NAME_MATCHING_MODES:
        raise SettingsError(
            f"person_name_matching {settings.person_name_matching!r} must be one of "
            f"{NAME_MATCHING_MODES}"
        )
    if settings.database_connections < 2 * MIN_PROCESS_CONNECTIONS:
        raise SettingsError(
            f"database_connections must be at least {2 * MIN_PROCESS_CONNECTIONS}")
    if settings.max_associations < 1:
        raise SettingsError("max_associations must be at least 1")
    if not 0 <= settings.dicom_workers <= 64:
        raise SettingsError("dicom_workers must be between 0 (one per core) and 64")
    if settings.stow_max_bytes < 1:
        raise SettingsError("stow_max_bytes must be at least 1")
    if settings.http_body_idle_timeout <= 0:
        raise SettingsError("http_body_idle_timeout must be positive")
    for network in settings.staff_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise SettingsError(f"staff_networks: {network!r} is not a network (CIDR)") from None
    for proxy in settings.trusted_proxies:
        # "*" (which uvicorn knows) would let any client name a staff address in
        # X-Forwarded-For; a mistyped address would silently trust nobody.
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise SettingsError(f"trusted_proxies: {proxy!r} is not an address or a network; "
                                "list the reverse proxies' own addresses") from None
    if settings.share_on_complete_pin not in ("", "generated", "birth-year"):
        raise SettingsError("share_on_complete_pin must be empty, generated or birth-year")
    if settings.study_complete_seconds <= 0:
        raise SettingsError("study_complete_seconds must be positive")
    for name in ("share_days", "share_session_hours", "share_pin_max_attempts",
                 "film_images_per_series", "hl7_max_connections"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"{name} must be at least 1")
    if not re.fullmatch(r"\s*\d{1,2}\s*[xX]\s*\d{1,2}\s*", settings.film_layout) or \
            min(settings.film_grid) < 1:
        raise SettingsError(f"film_layout {settings.film_layout!r} must be COLUMNSxROWS, "
                            "e.g. 4x5")
    if not 0 < settings.emr_retry_seconds <= settings.emr_retry_max_seconds:
        raise SettingsError("emr_retry_seconds must be positive and at most "
                            "emr_retry_max_seconds")


__all__ = ["Peer", "Settings", "SettingsError", "load_settings"]
