"""Small server-side SVG plots: no library, no script, every label escaped. Served as ``image/svg+xml``
and shown with ``<img>``, so even a hostile label could not run anything in the page."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

W, H = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 24, 28
PALETTE = {
    "succeeded": "#2e8b57",
    "failed": "#c0392b",
    "timed_out": "#e67e22",
    "cancelled": "#7f8c8d",
    "submit_unknown": "#8e44ad",
    "rejected": "#b7950b",
    "p50": "#2c7fb8",
    "p95": "#d95f0e",
}
OTHER = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def _svg(title: str, body: list[str], width: int = W, height: int = H) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'
        f'<rect width="{width}" height="{height}" fill="#fff"/>'
        f'<text x="{LEFT}" y="15" font-size="13" font-weight="bold">{escape(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    for step in (1, 2, 5):
        scale = 1.0
        while step * scale < value:
            scale *= 10
        candidates = [s * scale for s in (1, 2, 5) if s * scale >= value]
        if candidates:
            return min(candidates)
    return value


def _axes(ymax: float, unit: str) -> list[str]:
    out = []
    for i in range(5):
        v = ymax * i / 4
        y = H - BOTTOM - (H - TOP - BOTTOM) * i / 4
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        label = f"{v:g}" if v < 1000 else f"{v / 1000:g}k"
        out.append(
            f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}{escape(unit)}</text>'
        )
    return out


def _time_labels(start: float, minutes: int) -> list[str]:
    out = []
    plot_w = W - LEFT - RIGHT
    for m in range(0, minutes + 1, 10):
        x = LEFT + plot_w * m / minutes
        label = time.strftime("%H:%M", time.localtime(start + m * 60))
        out.append(f'<text x="{x:.1f}" y="{H - 10}" text-anchor="middle">{label}</text>')
    return out


def _legend(names: Sequence[str], colors: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    x = float(W - RIGHT)
    for name in reversed(names):
        x -= 8 + 7 * len(name) + 14
        out.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{colors[name]}"/>')
        out.append(f'<text x="{x + 14}" y="15">{escape(name)}</text>')
    return out


def stacked_bars(title: str, series: Mapping[str, Sequence[int]], start: float, minutes: int) -> str:
    """Counts per minute, one stacked bar per minute, one colour per series."""
    names = sorted(series, key=lambda n: (n != "succeeded", n))
    totals = [sum(series[n][i] for n in names) for i in range(minutes)]
    ymax = _nice_max(max(totals, default=0))
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    bw = plot_w / minutes
    colors = {n: PALETTE.get(n, OTHER[i % len(OTHER)]) for i, n in enumerate(names)}
    body = _axes(ymax, "")
    for i in range(minutes):
        y = float(H - BOTTOM)
        for n in names:
            v = series[n][i]
            if not v:
                continue
            h = plot_h * v / ymax
            y -= h
            body.append(
                f'<rect x="{LEFT + i * bw + 0.5:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{colors[n]}"><title>{escape(n)}: {v}</title></rect>'
            )
    body += _time_labels(start, minutes) + _legend(names, colors)
    if not any(totals):
        body.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#888">no jobs ended</text>')
    return _svg(title, body)


def lines(
    title: str, series: Mapping[str, Sequence[float | None]], start: float, minutes: int, unit: str = "s"
) -> str:
    """Values per equal time slot, one polyline per series (gaps where a slot has no value)."""
    names = list(series)
    values = [v for n in names for v in series[n] if v is not None]
    ymax = _nice_max(max(values, default=0))
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    colors = {n: PALETTE.get(n, OTHER[i % len(OTHER)]) for i, n in enumerate(names)}
    body = _axes(ymax, unit)
    for n in names:
        pts = series[n]
        slot = plot_w / max(len(pts), 1)
        path: list[str] = []
        for i, v in enumerate(pts):
            if v is None:
                if len(path) > 1:
                    body.append(_polyline(path, colors[n]))
                path = []
                continue
            x = LEFT + slot * (i + 0.5)
            y = H - BOTTOM - plot_h * v / ymax
            path.append(f"{x:.1f},{y:.1f}")
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colors[n]}">'
                f"<title>{escape(n)}: {v:.2f}{escape(unit)}</title></circle>"
            )
        if len(path) > 1:
            body.append(_polyline(path, colors[n]))
    body += _time_labels(start, minutes) + _legend(names, colors)
    if not values:
        body.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#888">no data</text>')
    return _svg(title, body)


def _polyline(points: list[str], color: str) -> str:
    return f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="2"/>'


def hbars(title: str, values: Mapping[str, float], unit: str = "", empty: str = "none") -> str:
    """One horizontal bar per label, longest first."""
    items = sorted(values.items(), key=lambda kv: -kv[1])[:14]
    height = max(70, TOP + 18 * len(items) + 16)
    ymax = _nice_max(max((v for _, v in items), default=0))
    label_w = 170
    plot_w = W - label_w - RIGHT - 60
    body = []
    for i, (label, v) in enumerate(items):
        y = TOP + 6 + 18 * i
        w = plot_w * v / ymax
        body.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{escape(label)}</text>')
        body.append(f'<rect x="{label_w}" y="{y}" width="{max(w, 1):.1f}" height="13" fill="#2c7fb8"/>')
        shown = f"{v:g}" if isinstance(v, int) or v == int(v) else f"{v:.1f}"
        body.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 11}">{escape(shown)}{escape(unit)}</text>')
    if not items:
        body.append(f'<text x="{LEFT}" y="{TOP + 22}" fill="#888">{escape(empty)}</text>')
    return _svg(title, body, W, height)
