"""Film avoided: what going paperless saved, as JSON, a small admin page and Prometheus metrics.

A study counts as *delivered digitally* once it has a share link that was not revoked (the
patient left with a QR code instead of an envelope of film; a link revoked because it was made
by mistake delivered nothing); *opened* once such a link was opened. Each delivered study
stands for the film sheets printing it would have taken (``film_sheets_per_study``, by
modality: the most sheets among the study's modalities), priced at ``film_sheet_price_vnd``.

``from`` and ``to`` are days of the server's time zone (``TZ``, e.g. ``Asia/Ho_Chi_Minh``):
a share made at 03:00 in Hà Nội belongs to that day, not to the UTC day before. They bound
when shares were created and when studies were archived.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import re
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from emr.service import emr_counts
from storage.index import Index, instances, shares, studies
from viewer.share_api import NOT_IMAGING

# Objects that are not images a film would show ("OT": mostly secondary captures of screens).
_NOT_FILMED = NOT_IMAGING | {"OT"}


@dataclasses.dataclass
class ModalityFigures:
    studies: int = 0
    sheets: int = 0
    saving_vnd: int = 0


@dataclasses.dataclass
class FilmStats:
    studies_archived: int
    studies_delivered: int  # with a share link
    studies_opened: int  # whose link was opened at least once
    shares_created: int  # revoked ones included
    shares_opened: int
    share_opens: int
    sheets_avoided: int
    saving_vnd: int
    sheet_price_vnd: int
    by_modality: dict[str, ModalityFigures]
    since: str | None = None
    until: str | None = None
    shares_revoked: int = 0
    timezone: str = ""  # of the days since and until, as an offset from UTC (+07:00)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def film_stats(index: Index, settings, *, since: dt.date | None = None,
               until: dt.date | None = None) -> FilmStats:
    """The figures for shares created, and studies archived, in [since, until] (whole days of
    the server's time zone; open-ended if None)."""
    statement = (
        sa.select(shares.c.study_instance_uid, shares.c.opened_count, shares.c.revoked_at,
                  studies.c.modalities_in_study)
        .select_from(shares.outerjoin(
            studies, studies.c.study_instance_uid == shares.c.study_instance_uid)))
    statement = statement.where(*_within(shares.c.created_at, since, until))
    archived_statement = (sa.select(sa.func.count()).select_from(studies)
                          .where(*_within(studies.c.created_at, since, until)))
    sheets_for = settings.film_sheets
    price = settings.film_sheet_price_vnd
    delivered: dict[str, str] = {}
    opened: set[str] = set()
    created = opened_shares = opens = revoked = 0
    with index.read() as conn:
        for study_uid, opened_count, revoked_at, modalities in conn.execute(statement):
            created += 1
            opens += opened_count
            if opened_count:
                opened_shares += 1
            if revoked_at is not None:
                revoked += 1
                continue
            if opened_count:
                opened.add(study_uid)
            delivered.setdefault(study_uid, modalities or "")
        archived = conn.execute(archived_statement).scalar()
    by_modality: dict[str, ModalityFigures] = {}
    for modalities in delivered.values():
        modality, sheets = _sheets(modalities, sheets_for)
        figures = by_modality.setdefault(modality, ModalityFigures())
        figures.studies += 1
        figures.sheets += sheets
        figures.saving_vnd += sheets * price
    total_sheets = sum(f.sheets for f in by_modality.values())
    return FilmStats(
        studies_archived=archived, studies_delivered=len(delivered),
        studies_opened=len(opened), shares_created=created, shares_opened=opened_shares,
        share_opens=opens, sheets_avoided=total_sheets, saving_vnd=total_sheets * price,
        sheet_price_vnd=price, by_modality=dict(sorted(by_modality.items())),
        since=since.isoformat() if since else None, until=until.isoformat() if until else None,
        shares_revoked=revoked, timezone=_utc_offset(since or until or dt.date.today()))


def _within(column: sa.Column, since: dt.date | None, until: dt.date | None) -> list:
    """Conditions keeping ``column`` (a UTC moment) within whole local days [since, until].

    From 0001-01-01, the first day a date names, is from the start, and to 9999-12-31, the
    last, is open-ended: their midnights may be moments no datetime holds (0000-12-31 UTC in
    Hà Nội; the day after 9999-12-31), and nothing was recorded before or after them."""
    conditions = []
    if since and since > dt.date.min:
        conditions.append(column >= _start(since))
    if until and until < dt.date.max:
        conditions.append(column < _start(until + dt.timedelta(days=1)))
    return conditions


def _sheets(modalities: str, sheets_for: dict[str, int]) -> tuple[str, int]:
    """(the modality the study is counted under, the sheets printing it would take)."""
    candidates = [m for m in modalities.split("\\") if m and m not in _NOT_FILMED]
    if not candidates:
        return "*", sheets_for.get("*", 1)
    return max(((m, sheets_for.get(m, sheets_for.get("*", 1))) for m in candidates),
               key=lambda pair: pair[1])


def _start(day: dt.date) -> dt.datetime:
    """Midnight starting ``day`` in the server's time zone, as a UTC moment (what the index
    holds; SQLite would compare a local time's digits as they are)."""
    return dt.datetime.combine(day, dt.time()).astimezone().astimezone(dt.UTC)


def _utc_offset(day: dt.date) -> str:
    """The server's offset from UTC on ``day``, as ``+07:00``; on the first and last days a
    date names, that of the day after or before (the system's local time cannot be asked
    about 0001-01-01: its conversion passes through year 0)."""
    day = min(max(day, dt.date.min + dt.timedelta(days=1)), dt.date.max - dt.timedelta(days=1))
    offset = dt.datetime.combine(day, dt.time(12)).astimezone().utcoffset() or dt.timedelta()
    sign = "-" if offset < dt.timedelta() else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


# ---------------------------------------------------------------------------- HTTP


def stats_routes(server) -> list[Route]:
    settings = server.settings
    index = server.archive.index

    async def stats_json(request: Request) -> Response:
        try:
            since, until = (_day(request.query_params, k) for k in ("from", "to"))
        except ValueError as exc:
            return JSONResponse({"status": 400, "message": str(exc)}, status_code=400)
        if since and until and since > until:
            return JSONResponse({"status": 400, "message": f"from: {since} is after to: "
                                                           f"{until}"}, status_code=400)
        figures = await run_in_threadpool(film_stats, index, settings, since=since,
                                          until=until)
        return JSONResponse(figures.as_json())

    async def admin_page(request: Request) -> Response:
        figures = await run_in_threadpool(film_stats, index, settings)
        recent = await run_in_threadpool(server.shares.list, limit=50)
        emr = await run_in_threadpool(emr_counts, index)
        return HTMLResponse(admin_html(settings.site_name, figures, recent, emr),
                            headers={"Cache-Control": "no-store"})

    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Collector(index, settings))

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        Route("/api/stats/film", stats_json, methods=["GET"]),
        Route("/admin", admin_page, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def _day(params, name: str) -> dt.date | None:
    """Query parameter ``name`` as a date written YYYY-MM-DD (ASCII digits; fromisoformat
    alone would also take 20210101 or 2021-W01-1)."""
    text = params.get(name)
    if not text:
        return None
    try:
        if not _DATE.fullmatch(text):
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}: {text[:40]!r} is not a date (YYYY-MM-DD)") from None


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class _Collector:
    """Prometheus figures computed from the index at each scrape (no counters to keep)."""

    def __init__(self, index: Index, settings) -> None:
        self.index = index
        self.settings = settings

    def describe(self):
        return []

    def collect(self):
        figures = film_stats(self.index, self.settings)
        with self.index.read() as conn:
            instance_count = conn.execute(
                sa.select(sa.func.count()).select_from(instances)).scalar()
        simple = [
            ("pacs_studies", "Studies in the archive", figures.studies_archived),
            ("pacs_instances", "Instances in the archive", instance_count),
            ("pacs_film_studies_delivered", "Studies delivered digitally (with a share link)",
             figures.studies_delivered),
            ("pacs_film_studies_opened", "Studies whose share link was opened",
             figures.studies_opened),
            ("pacs_shares_created", "Share links created", figures.shares_created),
            ("pacs_shares_revoked", "Share links revoked (not counted as delivered)",
             figures.shares_revoked),
            ("pacs_share_opens", "Times share links were opened", figures.share_opens),
        ]
        for name, text, value in simple:
            yield GaugeMetricFamily(name, text, value=value)
        sheets = GaugeMetricFamily("pacs_film_sheets_avoided",
                                   "Film sheets not printed, by modality", labels=["modality"])
        saving = GaugeMetricFamily("pacs_film_saving_vnd",
                                   "Estimated saving on film in VND, by modality",
                                   labels=["modality"])
        for modality, numbers in figures.by_modality.items():
            label = "other" if modality == "*" else modality
            sheets.add_metric([label], numbers.sheets)
            saving.add_metric([label], numbers.saving_vnd)
        yield sheets
        yield saving
        counts = emr_counts(self.index)
        for key, name, text, label in (
                ("orders", "pacs_emr_orders", "Orders from the EMR, by status", "status"),
                ("studies", "pacs_emr_studies", "Studies by link to an order (linked, "
                 "unmatched, dismissed)", "state"),
                ("deliveries", "pacs_emr_deliveries", "Results for the EMR, by delivery state "
                 "(pending, delivered, failed, superseded)", "state")):
            family = GaugeMetricFamily(name, text, labels=[label])
            for value, count in counts[key].items():
                family.add_metric([value], count)
            yield family


def _vnd(amount: int) -> str:
    return f"{amount:,}".replace(",", ".") + " ₫"


def admin_html(site_name: str, figures: FilmStats, recent,
               emr: dict[str, dict[str, int]] | None = None) -> str:
    summary = [
        ("Ca chụp trong kho / Studies archived", f"{figures.studies_archived:,}"),
        ("Ca trả kết quả bằng phim số / Studies delivered digitally",
         f"{figures.studies_delivered:,}"),
        ("Ca đã được mở xem / Studies opened", f"{figures.studies_opened:,}"),
        ("Liên kết đã tạo / Share links", f"{figures.shares_created:,}"),
        ("Liên kết đã thu hồi / Share links revoked", f"{figures.shares_revoked:,}"),
        ("Lượt mở / Opens", f"{figures.share_opens:,}"),
        ("Tờ phim không phải in / Film sheets avoided", f"{figures.sheets_avoided:,}"),
        ("Ước tính tiết kiệm / Estimated saving", _vnd(figures.saving_vnd)),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in summary)
    modalities = "".join(
        f"<tr><td>{html.escape('khác' if m == '*' else m)}</td><td>{f.studies:,}</td>"
        f"<td>{f.sheets:,}</td><td>{_vnd(f.saving_vnd)}</td></tr>"
        for m, f in figures.by_modality.items())
    share_rows = "".join(
        f"<tr><td>{s.id}</td><td><code>{html.escape(s.study_instance_uid)}</code></td>"
        f"<td>{html.escape(s.state().value)}</td><td>{s.opened_count}</td>"
        f"<td>{s.expires_at.astimezone().strftime('%d/%m/%Y')}</td>"
        f"<td><a href=\"/api/shares/{s.id}/slip\">phiếu / slip</a> · "
        f"<a href=\"/api/shares/{s.id}\">nhật ký / log</a></td></tr>" for s in recent)
    return f"""<!doctype html><html lang="vi"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>Quản trị – {html.escape(site_name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;margin:1rem 0}}th,td{{padding:.3rem .8rem;border-bottom:1px solid
#ddd;text-align:left}}code{{font-size:.8rem}}</style></head><body>
<h1>{html.escape(site_name)}: phim số / digital film</h1>
<p>Giá một tờ phim / price per sheet: {_vnd(figures.sheet_price_vnd)}.
<a href="/api/stats/film">JSON</a> · <a href="/metrics">Prometheus</a></p>
<table>{rows}</table>
<h2>Theo loại chụp / By modality</h2>
<table><tr><th>Loại</th><th>Ca</th><th>Tờ phim</th><th>Tiết kiệm</th></tr>{modalities}</table>
<h2>Liên kết gần đây / Recent share links</h2>
<table><tr><th>#</th><th>Study</th><th>Trạng thái</th><th>Lượt mở</th><th>Hết hạn</th>
<th></th></tr>{share_rows}</table>{_emr_html(emr or {})}</body></html>"""


def _emr_html(emr: dict[str, dict[str, int]]) -> str:
    """Orders, the unmatched queue and the results owed to the EMR, at a glance."""
    studies, deliveries = emr.get("studies", {}), emr.get("deliveries", {})
    rows = [("Chỉ định đang chờ chụp / Orders scheduled",
             emr.get("orders", {}).get("SCHEDULED", 0), "/api/orders?status=SCHEDULED"),
            ("Ca đã gắn chỉ định / Studies linked to orders", studies.get("linked", 0), ""),
            ("Ca chưa khớp chỉ định / Studies without an order", studies.get("unmatched", 0),
             "/api/emr/unmatched"),
            ("Kết quả đang chờ gửi / Results waiting", deliveries.get("pending", 0),
             "/api/emr/deliveries?state=pending"),
            ("Kết quả gửi lỗi / Results refused", deliveries.get("failed", 0),
             "/api/emr/deliveries?state=failed"),
            ("Kết quả đã gửi / Results delivered", deliveries.get("delivered", 0), "")]
    cells = "".join(
        f"<tr><th>{html.escape(text)}</th><td>{count:,}</td><td>"
        + (f'<a href="{link}">xem / list</a>' if link else "") + "</td></tr>"
        for text, count, link in rows)
    return f"<h2>Liên kết HIS/EMR / EMR links</h2><table>{cells}</table>"


__all__ = ["FilmStats", "admin_html", "film_stats", "stats_routes"]
