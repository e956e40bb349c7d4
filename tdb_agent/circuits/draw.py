"""Self-contained pictures of a circuit: an SVG (layers as rows, inputs at the bottom, the
logits at the top, edge widths by |weight|, explanations as tooltips and as notes under the
graph) and an HTML page that embeds it with tables of nodes, edges and evidence. No scripts,
no external files: the files open anywhere, offline.
"""

from __future__ import annotations

import json
import textwrap
from html import escape

import networkx as nx

from tdb_agent.circuits.model import stream_order
from tdb_agent.components import parse_component

BOX_W, BOX_H, GAP_X, ROW_H, LEFT, TOP = 120, 42, 18, 96, 96, 56
FILL = {"head": "#dbeafe", "attn": "#bfdbfe", "mlp": "#dcfce7", "neuron": "#bbf7d0", "emb": "#f3f4f6",
        "logits": "#fde68a", "sae": "#ede9fe"}
POS, NEG, NONE = "#2b6cb0", "#c53030", "#9ca3af"


def _row_label(key: tuple) -> str:
    layer, sub = key
    if layer == -1:
        return "embed"
    if layer == float("inf"):
        return "logits"
    return f"L{layer} " + ("attn", "mlp", "resid")[sub]


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def _layout(g: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], list[tuple[tuple, float]], float, float]:
    rows: dict[tuple, list[str]] = {}
    for n in g.nodes:
        rows.setdefault(stream_order(parse_component(n)), []).append(n)
    keys = sorted(rows, reverse=True)  # logits first (top)
    widest = max((len(v) for v in rows.values()), default=1)
    width = LEFT + widest * (BOX_W + GAP_X) + GAP_X
    pos, labels = {}, []
    for r, key in enumerate(keys):
        y = TOP + r * ROW_H
        labels.append((key, y))
        nodes = rows[key]
        x0 = LEFT + (widest - len(nodes)) * (BOX_W + GAP_X) / 2 + GAP_X
        for i, n in enumerate(nodes):
            pos[n] = (x0 + i * (BOX_W + GAP_X), y)
    return pos, labels, width, TOP + len(keys) * ROW_H


def _notes(g: nx.DiGraph, width: float) -> list[str]:
    chars = max(40, int((width - 20) / 6.6))
    out = []
    for n, a in g.nodes(data=True):
        if a.get("explanation") or a.get("role"):
            head = n + (f" ({a['role']})" if a.get("role") else "")
            text = f"{head}: {a['explanation']}" if a.get("explanation") else head
            out += textwrap.wrap(text, chars, subsequent_indent="    ", max_lines=3, placeholder=" …")
    return out


def to_svg(g: nx.DiGraph) -> str:
    pos, labels, width, height = _layout(g)
    notes = _notes(g, width)
    total_h = height + (20 + 16 * len(notes) if notes else 0) + 10
    f = g.graph.get("faithfulness")
    title = (g.graph.get("name") or "circuit") + (f" — faithfulness {f:.3f}" if f is not None else "")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{total_h:.0f}" '
           f'viewBox="0 0 {width:.0f} {total_h:.0f}" font-family="Helvetica, Arial, sans-serif">',
           f"<title>{escape(title)}</title>",
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="12" y="26" font-size="16" font-weight="bold">{escape(title)}</text>']
    for key, y in labels:
        out.append(f'<text x="12" y="{y + BOX_H / 2 + 4:.0f}" font-size="12" fill="#6b7280">'
                   f"{escape(_row_label(key))}</text>")
    weights = [abs(a["weight"]) for *_, a in g.edges(data=True) if a.get("weight") is not None]
    wmax = max(weights, default=1.0) or 1.0
    for s, t, a in g.edges(data=True):
        (xs, ys), (xt, yt) = pos[s], pos[t]
        x1, y1, x2, y2 = xs + BOX_W / 2, ys, xt + BOX_W / 2, yt + BOX_H
        w = a.get("weight")
        color = NONE if w is None else (POS if w >= 0 else NEG)
        sw = 1.0 if w is None else 1 + 6 * abs(w) / wmax
        dash = ' stroke-dasharray="4 3"' if w is None else ""
        my = (y1 + y2) / 2
        tip = f"{s} → {t} via {a.get('via', 'direct')}, weight {_fmt(w)}, {len(a.get('evidence') or [])} evidence"
        out.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},{my:.1f} {x2:.1f},{y2:.1f}" fill="none" '
                   f'stroke="{color}" stroke-width="{sw:.2f}" stroke-opacity="0.75"{dash}>'
                   f"<title>{escape(tip)}</title></path>")
        if a.get("via", "direct") != "direct":
            out.append(f'<text x="{(x1 + x2) / 2 + 4:.1f}" y="{my:.1f}" font-size="11" fill="{color}">'
                       f"{escape(a['via'])}</text>")
    for n, a in g.nodes(data=True):
        x, y = pos[n]
        tip = "\n".join(filter(None, [n, a.get("role"), a.get("explanation"), f"effect {_fmt(a.get('effect'))}",
                                      f"necessity {_fmt(a.get('necessity'))}"]))
        out.append(f"<g><title>{escape(tip)}</title>"
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="8" '
                   f'fill="{FILL.get(a.get("kind"), "#f3f4f6")}" stroke="#374151"/>'
                   f'<text x="{x + BOX_W / 2:.1f}" y="{y + 17:.1f}" font-size="12" font-weight="bold" '
                   f'text-anchor="middle">{escape(n)}</text>')
        if a.get("role"):
            role = textwrap.shorten(a["role"], 20, placeholder="…")
            out.append(f'<text x="{x + BOX_W / 2:.1f}" y="{y + 33:.1f}" font-size="10" text-anchor="middle" '
                       f'fill="#374151">{escape(role)}</text>')
        out.append("</g>")
    for i, line in enumerate(notes):
        out.append(f'<text x="12" y="{height + 20 + 16 * i:.0f}" font-size="11" fill="#111827" '
                   f'xml:space="preserve">{escape(line)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _evidence(ev: list) -> str:
    if not ev:
        return ""
    items = "".join(f"<li><code>{escape(e.get('tool', ''))}</code> {escape(json.dumps(e.get('args', {})))} → "
                    f"{escape(json.dumps(e.get('value')))}</li>" for e in ev)
    return f"<details><summary>{len(ev)}</summary><ul>{items}</ul></details>"


def to_html(g: nx.DiGraph) -> str:
    name = g.graph.get("name") or "circuit"
    v = g.graph.get("validation") or {}
    summary = [("behaviour", json.dumps(g.graph.get("behaviour"))), ("metric", g.graph.get("metric")),
               ("model", g.graph.get("model")), ("faithfulness", _fmt(g.graph.get("faithfulness")))]
    if v:
        summary += [("ablation", f"{v.get('mode')} — {v.get('positions')}"), ("universe", v.get("universe")),
                    ("metric full / empty / circuit", f"{_fmt(v.get('metric_full'))} / {_fmt(v.get('metric_empty'))}"
                                                     f" / {_fmt(v.get('metric_circuit'))}")]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(x))}</td></tr>" for k, x in summary if x is not None)
    nodes = "".join(
        f"<tr><td><code>{escape(n)}</code></td><td>{escape(a.get('kind') or '')}</td><td>{escape(a.get('role') or '')}"
        f"</td><td>{escape(a.get('explanation') or '')}</td><td>{_fmt(a.get('effect'))}</td>"
        f"<td>{_fmt(a.get('necessity'))}</td><td>{_evidence(a.get('evidence') or [])}</td></tr>"
        for n, a in g.nodes(data=True))
    edges = "".join(
        f"<tr><td><code>{escape(s)}</code></td><td><code>{escape(t)}</code></td><td>{escape(a.get('via', ''))}</td>"
        f"<td>{_fmt(a.get('weight'))}</td><td>{_evidence(a.get('evidence') or [])}</td></tr>"
        for s, t, a in g.edges(data=True))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(name)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #111827; }}
table {{ border-collapse: collapse; margin: 12px 0 24px; }}
th, td {{ border: 1px solid #d1d5db; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 13px; }}
th {{ background: #f3f4f6; }}
</style></head><body>
<h1>{escape(name)}</h1>
<p>{escape(g.graph.get('description') or '')}</p>
<table>{rows}</table>
{to_svg(g)}
<h2>Nodes</h2>
<table><tr><th>id</th><th>kind</th><th>role</th><th>explanation</th><th>effect</th><th>necessity</th><th>evidence</th></tr>
{nodes}</table>
<h2>Edges</h2>
<table><tr><th>source</th><th>target</th><th>via</th><th>weight</th><th>evidence</th></tr>
{edges}</table>
</body></html>
"""
