"""Person names: folding for case- and accent-insensitive matching (Vietnamese included), and
names and dates as people read them on pages, slips and films."""

from __future__ import annotations

import unicodedata

# Letters that Unicode decomposition leaves alone: the stroke is part of the letter, not a
# combining mark. Vietnamese đ/Đ is the one that matters most here.
_STROKED = str.maketrans({"đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "ø": "o", "Ø": "O",
                          "ł": "l", "Ł": "L", "ħ": "h", "Ħ": "H", "ı": "i", "ŧ": "t", "Ŧ": "T"})


def fold_text(text: str) -> str:
    """Lower-case, strip accents, and map stroked letters: ``Đặng`` -> ``dang``."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_STROKED))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def fold_person_name(name: str) -> str:
    """Folded form of a DICOM PN value for fuzzy matching.

    Components (``^``) become single spaces, so ``Nguyễn^Văn An`` and the typed query
    ``nguyen van an`` fold to the same text. Component groups (``=``: alphabetic, ideographic,
    phonetic) stay apart, each folded on its own, so a match can be on one group:
    ``Phạm^Thị Hoa=范^氏花`` -> ``pham thi hoa=范 氏花``. Empty trailing groups are dropped.
    Wildcards ``*`` and ``?`` are kept.
    """
    return "=".join(_fold_group(group) for group in name.split("=")).rstrip("=")


def _fold_group(group: str) -> str:
    # Folding may turn full-width ＾ and ＝ into ^ and =: they separate words here too, never
    # groups, which were split on before.
    folded = fold_text(group).replace("^", " ").replace("=", " ")
    return " ".join(folded.split())


def casefold_person_name(name: str) -> str:
    """Case-insensitive (accent-sensitive) form of a PN value, NFC-normalised."""
    return unicodedata.normalize("NFC", name).casefold()


def has_diacritics(text: str) -> bool:
    """True when folding would change more than the case of ``text``."""
    return fold_text(text) != unicodedata.normalize("NFC", text).casefold()


def display_person_name(name: str | None) -> str:
    """A PN value as people write it: ``Nguyễn^Văn An`` -> ``Nguyễn Văn An``.

    Vietnamese order is family, middle, given: DICOM's Family^Given^Middle components are
    put in that order. Only the first component group (the alphabetic one) is used.
    """
    parts = (name or "").split("=")[0].split("^")
    parts += [""] * (5 - len(parts))
    family, given, middle, prefix, suffix = (p.strip() for p in parts[:5])
    return " ".join(p for p in (prefix, family, middle, given, suffix) if p)


def display_date(value: str | None) -> str:
    """A DICOM date (DA) as dates are written in Vietnam: ``19870412`` -> ``12/04/1987``
    (anything else unchanged)."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[6:8]}/{text[4:6]}/{text[:4]}"
    return text
