"""What the EMR side may write to the log about a failure.

Exception texts quote values: pydantic's ``input_value=...``, SQL parameters, an EMR's answer.
Those values are patient names and IDs, so above DEBUG only the kind of failure and the
fields at fault are logged; the whole text goes to DEBUG.
"""

from __future__ import annotations

import pydantic


class InvalidResource(RuntimeError):
    """A FHIR resource built here is not valid (a bug, or a stored value FHIR cannot carry).

    The message names the resource type and the elements at fault, never their values."""

    def __init__(self, resource_type: str, locations: list[str]) -> None:
        super().__init__(f"{resource_type} would not be valid FHIR at "
                         + (", ".join(locations) or "?"))
        self.locations = locations


def error_locations(exc: pydantic.ValidationError, most: int = 5) -> list[str]:
    """The fields a validation error is about, with the kind of error: ``referrer.display
    (string_pattern_mismatch)``; the values are left out."""
    places = [".".join(str(part) for part in error["loc"]) + f" ({error['type']})"
              for error in exc.errors()]
    return list(dict.fromkeys(places))[:most]


def loggable(exc: BaseException) -> str:
    """What may be logged of ``exc`` at INFO or above: its type, and the fields at fault."""
    if isinstance(exc, pydantic.ValidationError):
        return f"{type(exc).__name__} at {', '.join(error_locations(exc))}"
    if isinstance(exc, InvalidResource):
        return str(exc)
    return type(exc).__name__
