"""Settings: defaults with no file, a TOML file, and PACS_* variables that override it."""

import os
import re
from pathlib import Path

import pytest

from pacs.settings import Peer, SettingsError, load_settings


def test_defaults_run_with_no_file_and_no_environment():
    settings = load_settings(environ={})
    assert settings.data_dir == Path("./pacs-data")
    assert settings.ae_title == "PACS"
    assert (settings.dicom_host, settings.dicom_port) == ("0.0.0.0", 11112)
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8042)
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("pacs-data/index.sqlite")
    assert settings.resolved_storage_url.startswith("file://")
    assert settings.peers == ()
    assert settings.duplicate_policy == "keep"


def test_environment_overrides_toml_file(tmp_path):
    config = tmp_path / "pacs.toml"
    config.write_text('ae_title = "FILEAE"\ndicom_port = 104\npeers = ["A@10.0.0.1:104"]\n')
    settings = load_settings(config, environ={"PACS_AE_TITLE": "ENVAE", "PACS_HTTP_PORT": "9000"})
    assert settings.ae_title == "ENVAE"
    assert settings.dicom_port == 104
    assert settings.http_port == 9000
    assert settings.peers == (Peer("A", "10.0.0.1", 104),)


def test_peers_from_environment_and_lookup():
    settings = load_settings(environ={"PACS_PEERS": "WS1@127.0.0.1:11113, OHIF@[::1]:104"})
    assert settings.peer("WS1") == Peer("WS1", "127.0.0.1", 11113)
    assert settings.peer("OHIF").host == "::1"
    assert settings.peer("NOBODY") is None


def test_postgresql_url_uses_psycopg3_driver():
    settings = load_settings(environ={"PACS_DATABASE_URL": "postgresql://u@db:5432/pacs"})
    assert settings.resolved_database_url == "postgresql+psycopg://u@db:5432/pacs"


def test_dicom_workers_default_to_the_cores_at_most_four():
    cores = len(os.sched_getaffinity(0))
    assert load_settings(environ={}).resolved_dicom_workers == max(1, min(4, cores))
    assert load_settings(environ={"PACS_DICOM_WORKERS": "1"}).resolved_dicom_workers == 1
    assert load_settings(environ={"PACS_DICOM_WORKERS": "6"}).resolved_dicom_workers == 6


@pytest.mark.parametrize(("workers", "total", "shares"), [
    ("1", "40", (40, 0)),  # one process: all of it
    ("2", "40", (20, 10)),
    ("4", "40", (20, 5)),
    ("4", "16", (4, 4)),  # each process gets at least four, even past the total
])
def test_database_connections_are_split_between_the_processes(workers, total, shares):
    settings = load_settings(environ={"PACS_DICOM_WORKERS": workers,
                                      "PACS_DATABASE_CONNECTIONS": total})
    assert settings.database_connection_shares() == shares


@pytest.mark.parametrize(("env", "message"), [
    ({"PACS_DICOM_PORT": "abc"}, "dicom_port"),
    ({"PACS_AE_TITLE": "A_TITLE_THAT_IS_TOO_LONG"}, "ae_title"),
    ({"PACS_PEERS": "nohostport"}, "AETITLE@host:port"),
    ({"PACS_DUPLICATE_POLICY": "ignore"}, "duplicate_policy"),
    ({"PACS_RECONCILE_ON_START": "maybe"}, "boolean"),
    ({"PACS_DICOM_WORKERS": "-1"}, "dicom_workers"),
    ({"PACS_DATABASE_CONNECTIONS": "3"}, "database_connections"),
    ({"PACS_TRUSTED_PROXIES": "*"}, "trusted_proxies: '\\*' is not an address"),
    ({"PACS_TRUSTED_PROXIES": "10.0.0.5,10.0.0.300"}, "trusted_proxies: '10.0.0.300'"),
])
def test_invalid_settings_are_refused_with_the_name(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=env)


def test_unknown_key_in_file_is_refused(tmp_path):
    config = tmp_path / "pacs.toml"
    config.write_text("dicom_prot = 104\n")
    with pytest.raises(SettingsError, match="dicom_prot"):
        load_settings(config, environ={})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(("text", "setting"), [
    ("dicom_port = 104.9", "dicom_port"),
    ("dicom_port = true", "dicom_port"),
    ("dicom_network_timeout = nan", "dicom_network_timeout"),
    ("http_body_idle_timeout = inf", "http_body_idle_timeout"),
    ("dicom_network_timeout = -5", "dicom_network_timeout"),
    ("dicom_max_pdu = -1", "dicom_max_pdu"),
    ("http_port = 0", "http_port"),
    ("public_url = 'pacs.hospital.vn'", "public_url"),
    ("public_url = 'https://pacs.hospital.vn:99999'", "public_url"),
    ("public_url = 'https://pacs.hospital.vn/?site=1'", "leave out the query"),
    ("public_url = 'https://pacs.hospital.vn#top'", "leave out the query"),
    ("peers = ['A@ :104']", "blank host"),
    ("emr_results_to = ['mllp://his:99999']", "emr_results_to"),
    ("log_level = 'LOUD'", "log_level"),
])
def test_a_toml_value_of_the_wrong_type_or_range_is_refused_naming_the_setting(
        tmp_path, text, setting):
    config = tmp_path / "pacs.toml"
    config.write_text(text + "\n")
    with pytest.raises(SettingsError, match=setting):
        load_settings(config, environ={})


def test_a_public_url_under_a_path_of_a_proxy_is_accepted():
    settings = load_settings(environ={"PACS_PUBLIC_URL": "https://benhvien.vn/pacs/"})
    assert settings.public_url == "https://benhvien.vn/pacs/"


def test_hl7_port_zero_still_means_no_listener():
    assert load_settings(environ={"PACS_HL7_PORT": "0"}).hl7_port == 0


def test_a_config_path_that_is_a_folder_or_not_utf8_is_a_settings_error(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("site_name = 'Bệnh viện'\n".encode("utf-16"))
    with pytest.raises(SettingsError, match="cannot be read: Is a directory"):
        load_settings(tmp_path, environ={})
    with pytest.raises(SettingsError, match="not valid UTF-8 TOML"):
        load_settings(latin1, environ={})


@pytest.mark.parametrize(("text", "message"), [
    ("cors_allowed_origins = ['https://emr.hospital.vn', 5]",
     "setting cors_allowed_origins: entry 5 is a TOML int, expected a string"),
    ("film_sheets_per_study = ['CT:2', {MR = 2}]",
     "setting film_sheets_per_study: entry {'MR': 2} is a TOML table"),
    ("peers = [['WS1@10.0.0.21:104']]", "setting peers: entry .* is a TOML array"),
    ("emr_results_to = 2575", "setting emr_results_to: 2575 is a TOML int, expected a list"),
    ("staff_networks = true", "setting staff_networks: True is a TOML bool"),
])
def test_a_toml_list_setting_holds_strings_only(tmp_path, text, message):
    config = tmp_path / "pacs.toml"
    config.write_text(text + "\n")
    with pytest.raises(SettingsError, match=message):
        load_settings(config, environ={})


def test_a_toml_list_setting_may_be_one_comma_separated_string_like_the_environment(tmp_path):
    config = tmp_path / "pacs.toml"
    config.write_text("cors_allowed_origins = 'https://a.hospital.vn, http://localhost:3000'\n")
    settings = load_settings(config, environ={})
    assert settings.cors_allowed_origins == ("https://a.hospital.vn", "http://localhost:3000")


def test_cors_origins_as_browsers_send_them_are_accepted():
    origins = "*,https://emr.hospital.vn,http://localhost:3000,http://[::1]:8080"
    settings = load_settings(environ={"PACS_CORS_ALLOWED_ORIGINS": origins})
    assert len(settings.cors_allowed_origins) == 4


@pytest.mark.parametrize(("origin", "message"), [
    ("https://emr.hospital.vn/", "'https://emr.hospital.vn/' ends in '/': browsers send"),
    ("https://emr.hospital.vn/viewer", "has more than scheme://host\\[:port\\]"),
    ("https://emr.hospital.vn?x=1", "has more than scheme://host\\[:port\\]"),
    ("emr.hospital.vn", "'emr.hospital.vn' is not an origin http\\(s\\)://host"),
    ("ftp://emr.hospital.vn", "is not an origin"),
    ("https://*.hospital.vn", "is not an origin"),
    ("null", "is not an origin"),
    ("https://emr.hospital.vn:99999", "is not an origin"),
    ("https://EMR.hospital.vn", "never matches: browsers send 'https://emr.hospital.vn'"),
    ("https://emr.hospital.vn:443", "never matches: browsers send 'https://emr.hospital.vn'"),
])
def test_a_cors_origin_that_would_never_match_is_refused(origin, message):
    with pytest.raises(SettingsError, match="cors_allowed_origins: .*" + message):
        load_settings(environ={"PACS_CORS_ALLOWED_ORIGINS": f"https://ok.hospital.vn,{origin}"})


def test_emr_destinations_of_both_kinds_are_accepted():
    destinations = "mllp://his:2575,mllp://[fd00::5]:2575,https://emr.hospital.vn:8443/fhir/"
    settings = load_settings(environ={"PACS_EMR_RESULTS_TO": destinations})
    assert len(settings.emr_results_to) == 3


@pytest.mark.parametrize(("destination", "message"), [
    ("mllp://his", "has no port: mllp://HOST:PORT"),
    ("mllp://his:0", "has a bad port"),
    ("mllp://his:70000", "has a bad port"),
    ("mllp://his:2575/orders", "nothing may follow mllp://HOST:PORT"),
    ("MLLP://his:2575", "is neither mllp://HOST:PORT nor a FHIR base URL"),
    ("his:2575", "is neither"),
    ("https://", "is neither"),
    ("https://emr.hospital.vn:abc/fhir", "has a bad port"),
    ("https://emr.hospital.vn/fhir?_format=json", "leave out the query"),
    ("https://pacs:secret@emr.hospital.vn/fhir", "user or password in the URL is not sent"),
])
def test_an_emr_destination_that_could_not_be_sent_to_is_refused(destination, message):
    expected = f"emr_results_to: '{re.escape(destination)}'.*{message}"
    with pytest.raises(SettingsError, match=expected):
        load_settings(environ={"PACS_EMR_RESULTS_TO": destination})


def test_film_sheets_take_any_modality_code_and_upper_case_it():
    settings = load_settings(environ={"PACS_FILM_SHEETS_PER_STUDY": "ct:3, OPT:1, *:1"})
    assert settings.film_sheets == {"CT": 3, "OPT": 1, "*": 1}


@pytest.mark.parametrize(("entries", "message"), [
    ("CT:2,MR", "'MR' is not MODALITY:SHEETS, e.g. CT:2"),
    ("CT:2.5", "'CT:2.5' is not MODALITY:SHEETS"),
    ("CT:-1", "'CT:-1' is not MODALITY:SHEETS"),
    ("CT:0", "'CT:0': sheets must be at least 1"),
    ("CT:2,ct:3", "CT is listed twice"),
])
def test_a_film_sheets_entry_that_cannot_be_read_is_refused(entries, message):
    with pytest.raises(SettingsError, match="film_sheets_per_study: " + message):
        load_settings(environ={"PACS_FILM_SHEETS_PER_STUDY": entries})


def test_a_peer_ae_title_listed_twice_is_refused():
    """C-MOVE to WS1 would always go to the first; the second address is never used."""
    with pytest.raises(SettingsError, match="peers: AE title 'WS1' is listed twice"):
        load_settings(environ={"PACS_PEERS": "WS1@10.0.0.21:104,WS1@10.0.0.22:104"})
