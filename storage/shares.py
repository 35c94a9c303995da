"""Share links: one study reachable with a random token, for the patient and for referrals.

A share's token is never stored: the index keeps its SHA-256 and a random nonce. With the
server secret, the nonce derives the token again (HMAC), so a result slip can be printed a
second time, while a copy of the database alone opens nothing. A share has an expiry, can be
revoked, may need a PIN (tried a limited number of times, slower after each miss, then
locked), and records every use in ``share_accesses``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
from typing import Any

import sqlalchemy as sa

from storage.errors import NotFound
from storage.index import (
    AUTOMATIC_SHARE,
    Index,
    iso_seconds,
    patients,
    share_accesses,
    shares,
    stored_utc,
    studies,
    utc_now,
)

TOKEN_CHARS = 22  # base64url of 16 bytes: 128 bits
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")
# ASCII digits only: ``\d`` (like str.isdigit and int) also takes "１２３４" or "١٢٣٤", which
# the patient, typing 1234, would then never match.
_PIN = re.compile(r"[0-9]{4,8}")
MAX_DAYS = 3650
# A share must outlive its own creation: shorter ones (1e-12 days) expired before anyone could
# open them. One hour is enough to show a study to someone sitting next to you.
MIN_DAYS = 1 / 24
MAX_ID = 2**63 - 1  # the largest key an INTEGER column holds (SQLite and PostgreSQL BIGINT)
PIN_KINDS = ("", "generated", "birth-year", "given")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


class ShareError(ValueError):
    """A share cannot be created or changed as asked (HTTP 400 / CLI error)."""


class AutomaticShareExists(ShareError):
    """The study has its automatic share already (made by this node or another)."""


class ShareState(enum.Enum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"
    LOCKED = "locked"  # too many wrong PINs; staff can unlock


class PinOutcome(enum.Enum):
    OK = "ok"
    NEEDED = "needed"  # the share has a PIN and none was given
    WRONG = "wrong"
    WAIT = "wait"  # tried again before the delay after the last miss ran out
    LOCKED = "locked"
    MALFORMED = "malformed"  # not 4-8 digits 0-9: cannot match, so not counted as a miss


@dataclasses.dataclass(frozen=True)
class PinResult:
    outcome: PinOutcome
    attempts_left: int = 0
    retry_after: int = 0  # seconds


@dataclasses.dataclass(frozen=True)
class Share:
    """One share link as the index holds it (without its token)."""

    id: int
    study_instance_uid: str
    token_sha256: str
    nonce: str
    pin_kind: str
    pin_hash: str | None
    pin_failures: int
    pin_retry_at: dt.datetime | None
    locked_at: dt.datetime | None
    allow_download: bool
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    opened_count: int
    first_opened_at: dt.datetime | None
    last_opened_at: dt.datetime | None

    @property
    def has_pin(self) -> bool:
        return bool(self.pin_hash)

    def state(self, now: dt.datetime | None = None) -> ShareState:
        now = now or utc_now()
        if self.revoked_at is not None:
            return ShareState.REVOKED
        if self.expires_at <= now:
            return ShareState.EXPIRED
        if self.locked_at is not None:
            return ShareState.LOCKED
        return ShareState.ACTIVE

    def summary(self) -> dict[str, Any]:
        """The share as the API shows it (no token, no PIN)."""
        return {
            "id": self.id,
            "study_instance_uid": self.study_instance_uid,
            "state": self.state().value,
            "pin": self.pin_kind or None,
            "pin_failures": self.pin_failures,
            "allow_download": self.allow_download,
            "created_by": self.created_by,
            "created_at": iso_seconds(self.created_at),
            "expires_at": iso_seconds(self.expires_at),
            "revoked_at": iso_seconds(self.revoked_at),
            "locked_at": iso_seconds(self.locked_at),
            "opened_count": self.opened_count,
            "first_opened_at": iso_seconds(self.first_opened_at),
            "last_opened_at": iso_seconds(self.last_opened_at),
        }


class ShareStore:
    """Shares in the index database. ``secret`` is the server's key (see ``pacs.access``)."""

    def __init__(self, index: Index, secret: bytes, *, pin_max_attempts: int = 5) -> None:
        self.index = index
        self._secret = secret
        self.pin_max_attempts = pin_max_attempts

    # ------------------------------------------------------------------ life cycle

    def create(self, study_uid: str, *, days: float, pin: str | None = None,
               allow_download: bool = False, created_by: str = "") -> tuple[Share, str]:
        """A new share of an archived study; returns it with its token (shown only now).

        ``pin``: None or "" for none, ``"generated"`` (6 digits, printable again on the
        slip), ``"birth-year"`` (the patient's year of birth from the index) or 4-8 digits 0-9.

        A study has at most one share ``created_by`` ``AUTOMATIC_SHARE``: a unique index keeps
        a second out (``AutomaticShareExists``), also when two nodes make it at once.
        """
        if not MIN_DAYS <= days <= MAX_DAYS:  # (also false for NaN)
            raise ShareError(f"days: must be at least 1/24 (one hour) and at most {MAX_DAYS}, "
                             f"not {days}")
        birth_date = self._study_birth_date(study_uid)
        nonce = secrets.token_hex(16)
        token = self._derive_token(nonce)
        pin_kind, pin_value = "", None
        if pin:
            if pin == "generated":
                pin_kind, pin_value = "generated", self._derive_pin(nonce)
            elif pin == "birth-year":
                if not re.match(r"[0-9]{4}", birth_date or ""):
                    raise ShareError("pin: the patient's birth date is not known; give a PIN "
                                     "or use pin=generated")
                pin_kind, pin_value = "birth-year", birth_date[:4]
            elif is_well_formed_pin(pin):
                pin_kind, pin_value = "given", pin
            else:
                raise ShareError("pin: use 4 to 8 digits (0-9), 'generated' or 'birth-year'")
        now = utc_now()
        values = {
            "study_instance_uid": study_uid, "token_sha256": token_digest(token),
            "nonce": nonce, "pin_kind": pin_kind,
            "pin_hash": _hash_pin(pin_value) if pin_value else None,
            "allow_download": bool(allow_download), "created_by": created_by[:200],
            "created_at": now, "expires_at": now + dt.timedelta(days=days),
        }
        try:
            with self.index.write_core() as conn:
                pk = conn.execute(shares.insert().values(**values)
                                  .returning(shares.c.pk)).scalar()
        except sa.exc.IntegrityError:
            if values["created_by"] != AUTOMATIC_SHARE:
                raise
            raise AutomaticShareExists(f"study {study_uid} has its automatic share already; "
                                       f"created_by {AUTOMATIC_SHARE!r} names that one, use "
                                       "another name") from None
        return self.get(pk), token

    def get(self, share_id: int) -> Share:
        if not 0 < share_id <= MAX_ID:  # (the database would raise OverflowError)
            raise NotFound(f"no share {share_id}")
        with self.index.read() as conn:
            row = conn.execute(sa.select(shares).where(shares.c.pk == share_id)).first()
        if row is None:
            raise NotFound(f"no share {share_id}")
        return _share(row)

    def by_token(self, token: str) -> Share | None:
        """The share of ``token`` whatever its state; None for an unknown or malformed one."""
        if not is_well_formed(token):
            return None
        with self.index.read() as conn:
            row = conn.execute(sa.select(shares).where(
                shares.c.token_sha256 == token_digest(token))).first()
        return _share(row) if row is not None else None

    def list(self, *, study_uid: str | None = None, created_by: str | None = None,
             limit: int = 100, offset: int = 0) -> list[Share]:
        """Shares, newest first. A negative limit would mean "no limit" to SQLite."""
        if not 0 <= limit <= MAX_ID:
            raise ShareError(f"limit: must be between 0 and {MAX_ID}")
        if not 0 <= offset <= MAX_ID:
            raise ShareError(f"offset: must be between 0 and {MAX_ID}")
        statement = sa.select(shares).order_by(shares.c.pk.desc()).limit(limit).offset(offset)
        if study_uid:
            statement = statement.where(shares.c.study_instance_uid == study_uid)
        if created_by is not None:
            statement = statement.where(shares.c.created_by == created_by)
        with self.index.read() as conn:
            return [_share(row) for row in conn.execute(statement)]

    def revoke(self, share_id: int) -> Share:
        self._update(share_id, revoked_at=utc_now())
        return self.get(share_id)

    def unlock(self, share_id: int) -> Share:
        """Clear the PIN lock and the count of misses (staff, after checking who asks)."""
        self._update(share_id, locked_at=None, pin_failures=0, pin_retry_at=None)
        return self.get(share_id)

    def _update(self, share_id: int, **values: Any) -> None:
        if not 0 < share_id <= MAX_ID:
            raise NotFound(f"no share {share_id}")
        with self.index.write_core() as conn:
            count = conn.execute(shares.update().where(shares.c.pk == share_id)
                                 .values(**values)).rowcount
        if not count:
            raise NotFound(f"no share {share_id}")

    # ------------------------------------------------------------------ tokens and PINs

    def token_of(self, share: Share) -> str:
        """The share's token again, for reprinting (``ShareError`` if the secret changed)."""
        token = self._derive_token(share.nonce)
        if token_digest(token) != share.token_sha256:
            raise ShareError("this share was made with another server secret; its link "
                             "cannot be shown again (create a new share)")
        return token

    def pin_of(self, share: Share) -> str | None:
        """The PIN to print on the slip, when it can be known again (generated, birth year)."""
        if share.pin_kind == "generated":
            return self._derive_pin(share.nonce)
        if share.pin_kind == "birth-year":
            birth_date = self._study_birth_date(share.study_instance_uid, missing_ok=True)
            return birth_date[:4] if birth_date else None
        return None

    def check_pin(self, share: Share, pin: str | None) -> PinResult:
        """Check a PIN attempt, counting misses: after each, a growing wait; at the limit, the
        share locks until staff unlock it.

        Each attempt first reserves its turn in one conditional UPDATE (not locked, no wait
        pending, misses below the limit; the reservation counts as a miss and holds the share
        for a second), so guesses sent at once are refused instead of all being tried, and a
        share can never take more misses than the limit. An attempt that is not 4-8 digits 0-9
        (a typing slip, digits of another script) cannot match any PIN and is not counted."""
        if not share.has_pin:
            return PinResult(PinOutcome.OK)
        pin = (pin or "").strip()
        if not pin:
            return self._pin_state(share)
        if not is_well_formed_pin(pin):
            left = max(self.pin_max_attempts - share.pin_failures, 0)
            return PinResult(PinOutcome.MALFORMED, left)
        now = utc_now()
        with self.index.write_core() as conn:
            failures = conn.execute(
                shares.update()
                .where(shares.c.pk == share.id, shares.c.locked_at.is_(None),
                       shares.c.pin_failures < self.pin_max_attempts,
                       sa.or_(shares.c.pin_retry_at.is_(None), shares.c.pin_retry_at <= now))
                .values(pin_failures=shares.c.pin_failures + 1,
                        pin_retry_at=now + _PIN_HOLD)
                .returning(shares.c.pin_failures)).scalar()
        if failures is None:  # locked, waiting, or another attempt holds the turn
            return self._pin_state(self.get(share.id), attempted=True)
        if _pin_matches(share.pin_hash, pin):
            self._update(share.id, pin_failures=0, pin_retry_at=None)
            return PinResult(PinOutcome.OK)
        if failures >= self.pin_max_attempts:
            self._update(share.id, locked_at=utc_now(), pin_retry_at=None)
            return PinResult(PinOutcome.LOCKED)
        wait = min(2 ** failures, 300)
        self._update(share.id, pin_retry_at=utc_now() + dt.timedelta(seconds=wait))
        return PinResult(PinOutcome.WRONG, self.pin_max_attempts - failures, wait)

    def _pin_state(self, share: Share, *, attempted: bool = False) -> PinResult:
        """Why a PIN cannot be tried now (or, with no attempt, that one is needed)."""
        left = max(self.pin_max_attempts - share.pin_failures, 0)
        if share.locked_at is not None or left == 0:
            return PinResult(PinOutcome.LOCKED)
        now = utc_now()
        if share.pin_retry_at is not None and share.pin_retry_at > now:
            wait = int((share.pin_retry_at - now).total_seconds()) + 1
            return PinResult(PinOutcome.WAIT, left, wait)
        if attempted:  # the turn was freed between the UPDATE and this read
            return PinResult(PinOutcome.WAIT, left, 1)
        return PinResult(PinOutcome.NEEDED, left)

    def _derive_token(self, nonce: str) -> str:
        digest = hmac.new(self._secret, b"share-token\0" + nonce.encode(), "sha256").digest()
        return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")

    def _derive_pin(self, nonce: str) -> str:
        digest = hmac.new(self._secret, b"share-pin\0" + nonce.encode(), "sha256").digest()
        return f"{int.from_bytes(digest[:8], 'big') % 1_000_000:06d}"

    # ------------------------------------------------------------------ access log

    def record(self, share_id: int, action: str, *, address: str = "", detail: str = "",
               session: str = "") -> None:
        """Log one use of a share; ``open`` also counts as the share being opened."""
        now = utc_now()
        with self.index.write_core() as conn:
            conn.execute(share_accesses.insert().values(
                share_pk=share_id, at=now, address=address[:64], action=action[:32],
                detail=detail[:500], session=session[:32]))
            if action == "open":
                conn.execute(shares.update().where(shares.c.pk == share_id).values(
                    opened_count=shares.c.opened_count + 1, last_opened_at=now,
                    first_opened_at=sa.func.coalesce(shares.c.first_opened_at, now)))

    def accesses(self, share_id: int, *, limit: int = 500) -> list[dict[str, Any]]:
        statement = (sa.select(share_accesses).where(share_accesses.c.share_pk == share_id)
                     .order_by(share_accesses.c.pk.desc()).limit(limit))
        with self.index.read() as conn:
            return [{"at": iso_seconds(stored_utc(r.at)), "address": r.address, "action": r.action,
                     "detail": r.detail, "session": r.session}
                    for r in conn.execute(statement)]

    # ------------------------------------------------------------------ helpers

    def _study_birth_date(self, study_uid: str, *, missing_ok: bool = False) -> str | None:
        statement = (sa.select(patients.c.patient_birth_date)
                     .select_from(studies.join(patients, studies.c.patient_pk == patients.c.pk))
                     .where(studies.c.study_instance_uid == study_uid))
        with self.index.read() as conn:
            row = conn.execute(statement).first()
        if row is None:
            if missing_ok:
                return None
            raise NotFound(f"no study {study_uid}")
        return row[0]


def is_well_formed(token: str) -> bool:
    return bool(_TOKEN.fullmatch(token or ""))


def is_well_formed_pin(pin: str) -> bool:
    """4 to 8 ASCII digits: what a PIN given by staff, generated or a birth year looks like."""
    return bool(_PIN.fullmatch(pin))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _hash_pin(pin: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def _pin_matches(stored: str | None, pin: str) -> bool:
    try:
        scheme, salt, digest = (stored or "").split("$")
    except ValueError:
        return False
    if scheme != "scrypt" or not is_well_formed_pin(pin):
        return False
    candidate = hashlib.scrypt(pin.encode(), salt=bytes.fromhex(salt), **_SCRYPT)
    return hmac.compare_digest(candidate.hex(), digest)


_PIN_HOLD = dt.timedelta(seconds=1)  # how long one PIN attempt holds the share's turn


def _share(row: Any) -> Share:
    return Share(
        id=row.pk, study_instance_uid=row.study_instance_uid,
        token_sha256=row.token_sha256, nonce=row.nonce,
        pin_kind=row.pin_kind, pin_hash=row.pin_hash, pin_failures=row.pin_failures,
        pin_retry_at=stored_utc(row.pin_retry_at), locked_at=stored_utc(row.locked_at),
        allow_download=bool(row.allow_download), created_by=row.created_by,
        created_at=stored_utc(row.created_at), expires_at=stored_utc(row.expires_at),
        revoked_at=stored_utc(row.revoked_at), opened_count=row.opened_count,
        first_opened_at=stored_utc(row.first_opened_at),
        last_opened_at=stored_utc(row.last_opened_at))


__all__ = ["AUTOMATIC_SHARE", "AutomaticShareExists", "MAX_DAYS", "MAX_ID", "MIN_DAYS",
           "PinOutcome", "PinResult", "Share", "ShareError", "ShareState", "ShareStore",
           "is_well_formed", "is_well_formed_pin", "token_digest"]
