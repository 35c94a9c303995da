"""Coding systems by the two names they go by: the mnemonic of HL7 v2 (table 0396, also the
DICOM Coding Scheme Designator) and the URI of FHIR.

An order's procedure code keeps the system as it came: ``LN`` from an HL7 ``OBR-4``,
``http://loinc.org`` from a FHIR ServiceRequest. FHIR requires ``Coding.system`` to be an
absolute URI and HL7 ``CWE-3`` a table 0396 mnemonic, so each way out translates with the one
table below; a system it does not know is left out there (the code and its text still go).
"""

from __future__ import annotations

# mnemonic (HL7 table 0396 / DICOM Coding Scheme Designator) -> FHIR system URI.
_SYSTEMS = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "RADLEX": "http://radlex.org",
    "UCUM": "http://unitsofmeasure.org",
}
# Other mnemonics for the same systems: read, never written (SNOMED's older designators).
_ALIASES = {"SNM": "SCT", "SNM3": "SCT", "SRT": "SCT", "LOINC": "LN", "CPT": "C4",
            "ICD10": "I10"}
_MNEMONICS = {uri: mnemonic for mnemonic, uri in _SYSTEMS.items()}


def is_uri(system: str) -> bool:
    """Whether ``system`` is a URI (a FHIR system) rather than a mnemonic."""
    return ":" in system


def fhir_system(system: str) -> str:
    """The FHIR ``Coding.system`` for an order's coding system: a URI as it is, a known
    mnemonic as its URI, anything else "" (leave ``system`` out: ``L``, ``99LOCAL``)."""
    system = system.strip()
    if is_uri(system):
        return system
    mnemonic = system.upper()
    return _SYSTEMS.get(_ALIASES.get(mnemonic, mnemonic), "")


def v2_system(system: str) -> str:
    """The HL7 v2 coding system (``CWE-3``, table 0396) for an order's coding system: a
    mnemonic as it is, a known URI as its mnemonic, another URI "" (it is not a mnemonic)."""
    system = system.strip()
    if not is_uri(system):
        return system
    return _MNEMONICS.get(system.rstrip("/"), "")


def dicom_designator(system: str, default: str = "L") -> str:
    """The DICOM Coding Scheme Designator (SH, 16 characters) for the worklist: the v2
    mnemonic, which DICOM shares for these systems; ``default`` when there is none."""
    return (v2_system(system) or default)[:16]
