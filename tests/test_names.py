"""Person-name folding: what makes accent-insensitive Vietnamese search work."""

from storage.names import casefold_person_name, fold_person_name, fold_text, has_diacritics


def test_fold_vietnamese_name_matches_typed_query():
    assert fold_person_name("Nguyễn^Văn An") == fold_person_name("nguyen van an") == "nguyen van an"


def test_fold_maps_d_with_stroke_which_decomposition_keeps():
    assert fold_text("Đặng Đình Đức") == "dang dinh duc"
    assert fold_text("đ") == "d"


def test_fold_keeps_wildcards_and_collapses_component_separators():
    assert fold_person_name("Lý^Thị*") == "ly thi*"
    assert fold_person_name("Trần^^Văn?") == "tran van?"


def test_casefold_keeps_accents_but_not_case():
    assert casefold_person_name("NGUYỄN^VĂN AN") == casefold_person_name("nguyễn^văn an")
    assert casefold_person_name("Nguyễn") != casefold_person_name("Nguyen")


def test_composed_and_decomposed_forms_fold_alike():
    decomposed = "Nguye\u0302\u0303n"  # e + circumflex + tilde as combining marks
    assert casefold_person_name(decomposed) == casefold_person_name("Nguyễn")
    assert fold_person_name(decomposed) == "nguyen"


def test_has_diacritics():
    assert has_diacritics("Nguyễn*")
    assert has_diacritics("Đ")
    assert not has_diacritics("NGUYEN^VAN*")


def test_fold_keeps_component_groups_apart_each_folded_on_its_own():
    assert fold_person_name("Phạm^Thị Hoa=范^氏花") == "pham thi hoa=范 氏花"
    assert fold_person_name("Trần^Mai==Tran^Hoa") == "tran mai==tran hoa"
    assert fold_person_name("Nguyễn^Văn An=") == fold_person_name("Nguyễn^Văn An^^") \
        == "nguyen van an"
    assert fold_person_name("=范*") == "=范*"


def test_fold_never_makes_a_group_of_a_full_width_sign():
    assert fold_person_name("山田＾太郎＝ヤマ") == "山田 太郎 ヤマ"  # NFKD makes ＾＝ ^ and =
