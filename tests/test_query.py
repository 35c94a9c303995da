"""DICOM matching (storage.query) on SQLite and PostgreSQL: one implementation, same answers."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import storage.index
from emr.model import Order, PatientInfo
from emr.orders import OrderStore
from storage.archive import open_archive
from storage.attributes import Level
from storage.errors import InvalidQuery
from storage.index import create_engine, run_migrations
from storage.query import NameMatching, Query, find
from tests.conftest import postgres_schema
from tests.factory import Spec, instance

PATIENTS = [
    # name, id, birth date, study date, study time, accession, modality, description
    ("Nguyễn^Văn An", "P001", "19800101", "20240105", "083000", "A100", "CT", "CT ngực"),
    ("Nguyễn^Thị Bình", "P002", "19900215", "20240110", "141500.25", "A101", "MR", "MR sọ não"),
    ("Nguyên^Văn Cường", "P003", "19751231", "20240201", "2359", "A102", "CT", "CT bụng"),
    ("Trần^Đức Dũng", "P004", "20010704", "20240215", "101010", "B200", "US", "Siêu âm"),
    ("Lý^Thị Hoa", "P005", "19651120", "20231231", "000001", "B201", "CR", "X quang ngực"),
    ("TRẦN^VĂN EM", "P006", "19500505", "20240301", "120000", "C300", "CT", "CT 50%_off"),
    ("Đặng^Đình Đức", "P007", "19880808", "20240302", "120000", "C301", "MR", "MR cột sống"),
]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def index(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url").replace("postgresql://",
                                                              "postgresql+psycopg://")
    archive = open_archive(url, f"file://{folder / 'blobs'}")
    with archive.index.engine.begin() as conn:  # module-scoped schema may be shared: start empty
        for table in ("instances", "series", "studies", "patients"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
    specs = {}
    for name, pid, birth, date, time, accession, modality, description in PATIENTS:
        spec = Spec(patient_name=name, patient_id=pid, birth_date=birth, study_date=date,
                    study_time=time, accession=accession, modality=modality,
                    study_description=description)
        archive.store(instance(spec))
        archive.store(instance(study_uid=spec.study_uid, series_uid=spec.series_uid,
                               patient_name=name, patient_id=pid, modality=modality,
                               instance_number=2))
        specs[pid] = spec
    # A second series of another modality in P001's study.
    archive.store(instance(study_uid=specs["P001"].study_uid, modality="SR",
                           patient_name="Nguyễn^Văn An", patient_id="P001",
                           sop_class="1.2.840.10008.5.1.4.1.1.88.11"))
    archive.specs = specs
    yield archive
    archive.close()


def ids(rows):
    return sorted(r["PatientID"] for r in rows)


def study_ids(index, keys, mode=NameMatching.AUTO, **kwargs):
    return ids(find(index.index, Query(Level.STUDY, keys, mode, **kwargs)))


def test_universal_matching_returns_everything(index):
    assert len(study_ids(index, {})) == 7
    assert len(study_ids(index, {"PatientName": "*"})) == 7
    assert len(study_ids(index, {"PatientName": ""})) == 7


def test_single_value_matching_is_exact(index):
    assert study_ids(index, {"PatientID": "P004"}) == ["P004"]
    assert study_ids(index, {"PatientID": "P00"}) == []
    assert study_ids(index, {"AccessionNumber": "A101"}) == ["P002"]


def test_wildcards_star_and_question_mark(index):
    assert study_ids(index, {"AccessionNumber": "A*"}) == ["P001", "P002", "P003"]
    assert study_ids(index, {"AccessionNumber": "?20?"}) == ["P004", "P005"]
    assert study_ids(index, {"StudyDescription": "*ngực"}) == ["P001", "P005"]


def test_sql_wildcard_characters_in_values_are_literal(index):
    assert study_ids(index, {"StudyDescription": "*50%_off"}) == ["P006"]
    assert study_ids(index, {"StudyDescription": "*%*"}) == ["P006"]
    assert study_ids(index, {"StudyDescription": "CT_*"}) == []


def test_vietnamese_name_with_diacritics_matches_accents_exactly(index):
    assert study_ids(index, {"PatientName": "Nguyễn*"}) == ["P001", "P002"]
    assert study_ids(index, {"PatientName": "Nguyên*"}) == ["P003"]


def test_name_without_diacritics_finds_the_accented_names(index):
    assert study_ids(index, {"PatientName": "nguyen van an"}) == ["P001"]
    assert study_ids(index, {"PatientName": "NGUYEN*"}) == ["P001", "P002", "P003"]
    assert study_ids(index, {"PatientName": "dang dinh duc"}) == ["P007"]
    assert study_ids(index, {"PatientName": "tran*"}) == ["P004", "P006"]


def test_person_name_lists_and_empty_trailing_components(index):
    """PS3.4 C.2.2.2.1: a list of names matches any of them, each folded on its own terms
    (a list matched nothing); empty trailing components are no part of a name."""
    assert study_ids(index, {"PatientName": "Nguyễn^Văn An\\Trần^Đức Dũng"}) == ["P001", "P004"]
    assert study_ids(index, {"PatientName": "nguyen^van an\\lý*"}) == ["P001", "P005"]
    assert study_ids(index, {"PatientName": "dang*\\tran*"}) == ["P004", "P006", "P007"]
    assert study_ids(index, {"PatientName": "Trần^Đức Dũng^^^"}) == ["P004"]
    assert study_ids(index, {"PatientName": "Tr?n^Đức Dũng^"}) == ["P004"]


def test_stored_names_with_empty_trailing_components_are_found(tmp_path):
    archive = open_archive(f"sqlite:///{tmp_path / 'i.sqlite'}", f"file://{tmp_path / 'b'}")
    try:
        archive.store(instance(patient_name="Lê^Văn Tám^^^", patient_id="P9"))
        for query in ("Lê^Văn Tám", "lê^văn tám^", "Lê^Văn Tám^^^^", "le van tam", "Lê^V?n Tám"):
            assert study_ids(archive, {"PatientName": query}) == ["P9"], query
        assert study_ids(archive, {"PatientName": "Lê^Văn"}) == []  # still the whole name
    finally:
        archive.close()


def test_person_name_matching_ignores_case(index):
    assert study_ids(index, {"PatientName": "trần^văn em"}) == ["P006"]
    assert study_ids(index, {"PatientName": "LÝ^THỊ*"}) == ["P005"]


def test_name_matching_modes(index):
    assert study_ids(index, {"PatientName": "nguyen*"}, NameMatching.EXACT) == []
    assert study_ids(index, {"PatientName": "Nguyễn*"}, NameMatching.FUZZY) == \
        ["P001", "P002", "P003"]


# Names with more than the alphabetic component group (PS3.5 6.2.1: alphabetic=ideographic=
# phonetic, representations of one name). Each group of a query matches the same group.
GROUPED_NAMES = [
    ("Phạm^Thị Hoa=范^氏花", "G1"),
    ("Phạm^Thị Hoa Nguyễn", "G2"),  # a longer alphabetic name with the same beginning
    ("Phạm^Thị Hoa", "G3"),  # the same alphabetic name, no other group
    ("Đỗ^Văn Đức^^=杜^文德", "G4"),  # empty trailing components in the alphabetic group
    ("Trần^Mai==tran^hoa", "G5"),  # a phonetic group, no ideographic one
    ("Lý^Hoa=范^氏花", "G6"),  # the same ideographic group as G1, another alphabetic one
    ("Yamada^Tarō=山田^太郎=やまだ^たろう", "G7"),  # all three; kana with voicing marks
]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def grouped(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{folder / 'index.sqlite'}"
        else:  # a schema of its own: the module's other index may be open at the same time
            url = stack.enter_context(postgres_schema()).replace("postgresql://",
                                                                 "postgresql+psycopg://")
        archive = open_archive(url, f"file://{folder / 'blobs'}")
        stack.callback(archive.close)
        for name, pid in GROUPED_NAMES:
            archive.store(instance(patient_name=name, patient_id=pid))
        yield archive


def test_alphabetic_name_finds_names_with_ideographic_or_phonetic_groups(grouped):
    for mode in NameMatching:
        assert study_ids(grouped, {"PatientName": "Phạm^Thị Hoa"}, mode) == ["G1", "G3"], mode
    assert study_ids(grouped, {"PatientName": "pham^thi hoa"}) == ["G1", "G3"]
    assert study_ids(grouped, {"PatientName": "PHẠM^THỊ HOA"}) == ["G1", "G3"]
    assert study_ids(grouped, {"PatientName": "pham thi hoa"}) == ["G1", "G3"]
    assert study_ids(grouped, {"PatientName": "tran^mai"}) == ["G5"]
    assert study_ids(grouped, {"PatientName": "Phạm^Thị"}) == []  # still the whole name
    assert study_ids(grouped, {"PatientName": "范^氏花"}) == []  # an alphabetic group here


def test_wildcards_match_within_the_alphabetic_group(grouped):
    assert study_ids(grouped, {"PatientName": "Phạm*"}) == ["G1", "G2", "G3"]
    assert study_ids(grouped, {"PatientName": "pham^thi hoa*"}) == ["G1", "G2", "G3"]
    assert study_ids(grouped, {"PatientName": "*Hoa"}) == ["G1", "G3", "G6"]
    assert study_ids(grouped, {"PatientName": "*hoa"}) == ["G1", "G3", "G6"]  # not G5's tran^hoa
    assert study_ids(grouped, {"PatientName": "Ph?m^Thị Hoa"}) == ["G1", "G3"]
    assert study_ids(grouped, {"PatientName": "*氏花"}) == []
    everyone = [pid for _, pid in GROUPED_NAMES]
    assert study_ids(grouped, {"PatientName": "*=*"}) == everyone
    assert study_ids(grouped, {"PatientName": "="}) == everyone


def test_ideographic_and_phonetic_groups_of_the_query_match_the_same_groups(grouped):
    assert study_ids(grouped, {"PatientName": "=范^氏花"}) == ["G1", "G6"]
    assert study_ids(grouped, {"PatientName": "Phạm^Thị Hoa=范^氏花"}) == ["G1"]
    assert study_ids(grouped, {"PatientName": "pham^thi hoa=范^氏花"}) == ["G1"]
    assert study_ids(grouped, {"PatientName": "*=范*"}) == ["G1", "G6"]
    assert study_ids(grouped, {"PatientName": "Phạm^Thị Hoa=杜^文德"}) == []
    assert study_ids(grouped, {"PatientName": "==tran^hoa"}) == ["G5"]
    assert study_ids(grouped, {"PatientName": "==TRAN*"}) == ["G5"]
    assert study_ids(grouped, {"PatientName": "Trần^Mai=*=tran^hoa"}) == ["G5"]
    # Accents are judged group by group: the kana's voicing marks do not make the alphabetic
    # group accent-sensitive; in the kana, as in any group, marks typed count, others not.
    assert study_ids(grouped, {"PatientName": "yamada^taro==やまだ^たろう"}) == ["G7"]
    assert study_ids(grouped, {"PatientName": "yamada^taro==やまだ^だろう"}) == []
    assert study_ids(grouped, {"PatientName": "yamada^taro==やまた^たろう"}) == ["G7"]


def test_grouped_names_ignore_empty_trailing_components_and_come_in_lists(grouped):
    assert study_ids(grouped, {"PatientName": "Đỗ^Văn Đức"}) == ["G4"]
    assert study_ids(grouped, {"PatientName": "do^van duc"}) == ["G4"]
    assert study_ids(grouped, {"PatientName": "Đỗ^Văn Đức^=杜^文德^^"}) == ["G4"]
    assert study_ids(grouped, {"PatientName": "Đ?^Văn Đức"}) == ["G4"]
    assert study_ids(grouped, {"PatientName": "Phạm^Thị Hoa Nguyễn\\=杜^文德"}) == ["G2", "G4"]
    assert study_ids(grouped, {"PatientName": "lý^hoa\\tran*"}) == ["G5", "G6"]


def test_patient_level_and_worklist_match_component_groups_alike(grouped):
    rows = find(grouped.index, Query(Level.PATIENT, {"PatientName": "pham^thi hoa"}))
    assert ids(rows) == ["G1", "G3"]
    orders = OrderStore(grouped.index)
    orders.apply(Order(accession_number="W-G1", modality="CT", scheduled_date="20260105",
                       patient=PatientInfo("G1", name="Phạm^Thị Hoa=范^氏花")))
    for query in ("pham^thi hoa", "Phạm^Thị Hoa", "Phạm*", "*hoa", "=范^氏花"):
        found = orders.worklist({"PatientName": query}, NameMatching.AUTO)
        assert [stored.order.accession_number for stored in found] == ["W-G1"], query
    assert orders.worklist({"PatientName": "=杜^文德"}, NameMatching.AUTO) == []


@pytest.fixture(params=["sqlite", "postgres"])
def index_at_0005(request, tmp_path):
    """An empty index database migrated up to 0005 only (names folded with groups together)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url").replace("postgresql://",
                                                                    "postgresql+psycopg://")
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location",
                           str(Path(storage.index.__file__).parent / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0005")
    yield engine, config
    engine.dispose()


def test_migration_0006_folds_the_groups_of_names_stored_before_apart(index_at_0005):
    engine, config = index_at_0005
    now = dt.datetime.now(dt.UTC)
    stamp = {"created_at": now, "updated_at": now}
    with engine.begin() as conn:
        conn.execute(storage.index.patients.insert(), [
            {"pk": 1, "patient_id": "G1", "patient_name": "Phạm^Thị Hoa=范^氏花",
             "patient_name_ci": "phạm^thị hoa=范^氏花",
             "patient_name_fold": "pham thi hoa 范 氏花", **stamp},
            {"pk": 2, "patient_id": "P1", "patient_name": "Nguyễn^Văn An",
             "patient_name_ci": "nguyễn^văn an", "patient_name_fold": "nguyen van an", **stamp},
            # A full-width ＝ folded (NFKD) to "=" in the old fold, kept as such.
            {"pk": 3, "patient_id": "W1", "patient_name": "Yamada^Taro＝山田^太郎",
             "patient_name_ci": "yamada^taro＝山田^太郎",
             "patient_name_fold": "yamada taro=山田 太郎", **stamp}])
        conn.execute(storage.index.emr_patients.insert().values(
            pk=1, patient_id="G1", name="Phạm^Thị Hoa=范^氏花", name_ci="phạm^thị hoa=范^氏花",
            name_fold="pham thi hoa 范 氏花", **stamp))

    def folds():
        with engine.connect() as conn:
            return (conn.execute(sa.text("SELECT patient_name_fold FROM patients ORDER BY pk"))
                    .scalars().all(),
                    conn.execute(sa.text("SELECT name_fold FROM emr_patients")).scalar())

    run_migrations(engine)
    assert folds() == (["pham thi hoa=范 氏花", "nguyen van an", "yamada taro 山田 太郎"],
                       "pham thi hoa=范 氏花")
    rows = find(storage.index.Index(engine), Query(Level.PATIENT, {"PatientName": "pham thi hoa"}))
    assert ids(rows) == ["G1"]
    rows = find(storage.index.Index(engine), Query(Level.PATIENT, {"PatientName": "yamada*"}))
    assert ids(rows) == ["W1"]
    with engine.begin() as conn:  # and back
        config.attributes["connection"] = conn
        command.downgrade(config, "0005")
    assert folds() == (["pham thi hoa 范 氏花", "nguyen van an", "yamada taro=山田 太郎"],
                       "pham thi hoa 范 氏花")


def test_date_ranges(index):
    assert study_ids(index, {"StudyDate": "20240101-20240131"}) == ["P001", "P002"]
    assert study_ids(index, {"StudyDate": "20240301-"}) == ["P006", "P007"]
    assert study_ids(index, {"StudyDate": "-20231231"}) == ["P005"]
    assert study_ids(index, {"StudyDate": "20240215"}) == ["P004"]
    assert study_ids(index, {"PatientBirthDate": "19800101-19901231"}) == ["P001", "P002",
                                                                           "P007"]


def test_time_ranges_compare_times_of_any_precision(index):
    assert study_ids(index, {"StudyTime": "1200-1300"}) == ["P006", "P007"]
    assert study_ids(index, {"StudyTime": "-0830"}) == ["P001", "P005"]
    assert study_ids(index, {"StudyTime": "2359-"}) == ["P003"]
    assert study_ids(index, {"StudyTime": "14"}) == ["P002"]  # the whole hour


def test_uid_lists(index):
    specs = index.specs
    uids = "\\".join(specs[p].study_uid for p in ("P002", "P005"))
    assert study_ids(index, {"StudyInstanceUID": uids}) == ["P002", "P005"]
    comma = ",".join(specs[p].study_uid for p in ("P003", "P004"))
    assert study_ids(index, {"StudyInstanceUID": comma}) == ["P003", "P004"]


def test_uids_of_lower_levels_are_ignored_not_multiplied(index):
    """A STUDY query carrying a series UID, or a PATIENT query carrying study UIDs, matched on a
    table that was not joined: every study for each series row, every patient twice. Keys
    below the level match nothing there; like other such C-FIND keys, they are ignored."""
    specs = index.specs
    assert len(study_ids(index, {"SeriesInstanceUID": specs["P003"].series_uid})) == 7
    assert len(study_ids(index, {"SOPInstanceUID": specs["P003"].sop_uid})) == 7
    two = "\\".join(specs[p].study_uid for p in ("P002", "P005"))
    patients = find(index.index, Query(Level.PATIENT, {"StudyInstanceUID": two}))
    assert ids(patients) == [f"P00{n}" for n in range(1, 8)]  # each patient once
    assert study_ids(index, {"StudyInstanceUID": two}) == ["P002", "P005"]


def test_modalities_in_study_matches_any_series(index):
    assert study_ids(index, {"ModalitiesInStudy": "SR"}) == ["P001"]
    assert study_ids(index, {"ModalitiesInStudy": "US\\CR"}) == ["P004", "P005"]
    rows = find(index.index, Query(Level.STUDY, {"PatientID": "P001"}))
    assert rows[0]["ModalitiesInStudy"] == "CT\\SR"


def test_series_and_instance_levels_match_on_their_own_and_upper_keys(index):
    series = find(index.index, Query(Level.SERIES, {"Modality": "CT"}))
    assert ids(series) == ["P001", "P003", "P006"]
    assert all(r["NumberOfSeriesRelatedInstances"] == 2 for r in series)
    images = find(index.index, Query(Level.INSTANCE, {"PatientID": "P004",
                                                      "InstanceNumber": "2"}))
    assert len(images) == 1 and images[0]["InstanceNumber"] == 2
    assert images[0]["_blob_key"].endswith(".dcm")


def test_patient_level(index):
    rows = find(index.index, Query(Level.PATIENT, {"PatientName": "nguyen*"}))
    assert ids(rows) == ["P001", "P002", "P003"]
    p001 = next(r for r in rows if r["PatientID"] == "P001")
    assert (p001["NumberOfPatientRelatedStudies"], p001["NumberOfPatientRelatedSeries"],
            p001["NumberOfPatientRelatedInstances"]) == (1, 2, 3)


def test_limit_and_offset_page_through_results(index):
    first = find(index.index, Query(Level.STUDY, {}, limit=3))
    rest = find(index.index, Query(Level.STUDY, {}, limit=10, offset=3))
    assert len(first) == 3 and len(rest) == 4
    assert not {r["StudyInstanceUID"] for r in first} & {r["StudyInstanceUID"] for r in rest}


def test_return_keys_outside_the_index_come_from_stored_json(index):
    rows = find(index.index, Query(Level.STUDY, {"PatientID": "P004"},
                                   extra_tags=frozenset({"00080090", "00280010"})))
    assert rows[0]["_extra"]["00080090"]["Value"] == [{"Alphabetic": "Trần^Thị Bình"}]
    assert rows[0]["_extra"]["00280010"]["Value"] == [8]


@pytest.mark.parametrize(("keys", "keyword"), [
    ({"StudyDate": "2024-01-01"}, "StudyDate"),
    ({"StudyDate": "20240101-20231231"}, "StudyDate"),
    ({"StudyDate": "20240101-20240201-20240301"}, "StudyDate"),
    ({"StudyTime": "25:00"}, "StudyTime"),
    ({"StudyInstanceUID": "1.2.abc"}, "StudyInstanceUID"),
    ({"StudyDate": "20200230"}, "StudyDate"),  # no such day
    ({"StudyDate": "20200101-20230229"}, "StudyDate"),
    # Lists of alternatives past 100 (SQLite refused 500 with a 500 answer).
    ({"PatientName": "\\".join(f"nguyen{n}*" for n in range(101))}, "PatientName"),
    ({"AccessionNumber": "\\".join(f"A{n}" for n in range(101))}, "AccessionNumber"),
    ({"ModalitiesInStudy": "\\".join(["CT"] * 101)}, "ModalitiesInStudy"),
])
def test_malformed_keys_are_refused_naming_the_attribute(index, keys, keyword):
    with pytest.raises(InvalidQuery) as raised:
        find(index.index, Query(Level.STUDY, keys))
    assert raised.value.keyword == keyword


def test_lists_of_up_to_100_alternatives_are_matched(index):
    names = ["nguyen*"] + [f"khong co {n}*" for n in range(98)] + ["Trần^Đức Dũng"]
    accessions = ["A100"] + [f"NONE{n}" for n in range(98)] + ["C301"]

    assert study_ids(index, {"PatientName": "\\".join(names)}, NameMatching.FUZZY) == \
        ["P001", "P002", "P003", "P004"]
    assert study_ids(index, {"AccessionNumber": "\\".join(accessions)}) == ["P001", "P007"]


def test_integer_keys_refuse_text(index):
    with pytest.raises(InvalidQuery, match="InstanceNumber"):
        find(index.index, Query(Level.INSTANCE, {"InstanceNumber": "first"}))
