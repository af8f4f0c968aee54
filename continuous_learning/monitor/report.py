"""`cl report`: a self-contained HTML report (charts inlined as base64 PNG) and a Markdown twin with the PNGs
saved beside it, in `logs/reports/`. Whatever is missing (no adapters, no ratings, too little traffic for a
drift check) is said in its section instead of failing the report."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .. import registry
from ..core.errors import CLError
from ..core.settings import Settings
from ..storage.store import atomic_write_bytes, iter_jsonl

HELPFUL_DAYS = 90


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)  # plain sentences
    table: tuple[list[str], list[list[str]]] | None = None
    chart: str | None = None  # chart name, when the section has one
    png: bytes | None = None


# --- data -------------------------------------------------------------------------------------------------
def loss_history(settings: Settings, entry: registry.Adapter) -> list[tuple[int, float]]:
    """(step, loss) rows an adapter's training wrote to `metrics.jsonl` in its folder."""
    try:
        folder = registry.confined(settings, entry.path or f"adapters/{entry.version}")
    except CLError:
        return []
    rows = []
    for _, row in iter_jsonl(folder / "metrics.jsonl"):
        numbers = isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in ("step", "loss"))
        if numbers:
            rows.append((int(row["step"]), float(row["loss"])))
    return rows


def eval_points(doc: dict) -> list[tuple[str, float, float | None]]:
    """(label, keyword accuracy, general accuracy) of the latest eval of the base model and every adapter."""
    from ..registry import adapters_by_version

    points = []
    base = (doc.get("base_evals") or [None])[-1]
    if base and base.get("accuracy") is not None:
        points.append(("base", float(base["accuracy"]), base.get("general_accuracy")))
    for entry in adapters_by_version(doc):
        last = entry.latest_eval
        if last and last.get("accuracy") is not None:
            points.append((entry.version, float(last["accuracy"]), last.get("general_accuracy")))
    return points


# --- charts ----------------------------------------------------------------------------------------------
def _plot(draw: Callable) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6))
    try:
        draw(axis)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()
    finally:
        plt.close(figure)


def eval_chart(points: list[tuple[str, float, float | None]]) -> bytes:
    def draw(axis):
        labels = [p[0] for p in points]
        axis.plot(labels, [p[1] for p in points], marker="o", label="keyword accuracy")
        general = [(p[0], p[2]) for p in points if p[2] is not None]
        if general:
            axis.plot([g[0] for g in general], [g[1] for g in general], marker="s", label="general accuracy")
        axis.set_ylim(0, 1.05)
        axis.set_xlabel("adapter version")
        axis.set_ylabel("accuracy")
        axis.legend()
        axis.set_title("evaluation across adapter versions")

    return _plot(draw)


def loss_chart(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    def draw(axis):
        for version, rows in curves.items():
            axis.plot([r[0] for r in rows], [r[1] for r in rows], label=version)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.legend()
        axis.set_title("training loss per adapter")

    return _plot(draw)


def helpful_chart(per_day: list[dict]) -> bytes:
    def draw(axis):
        days = [d for d in per_day if d["helpful_rate"] is not None]
        axis.plot([d["day"][5:] for d in days], [d["helpful_rate"] for d in days], marker="o")
        axis.set_ylim(0, 1.05)
        axis.set_ylabel("helpful rate")
        axis.set_title("helpful rate of rated turns, per day")
        axis.tick_params(axis="x", labelrotation=60, labelsize=7)

    return _plot(draw)


def drift_chart(features: list[dict], warn: float, alert: float) -> bytes:
    def draw(axis):
        judged = [f for f in features if f.get("psi") is not None]
        axis.bar([f["name"] for f in judged], [f["psi"] for f in judged], color="tab:blue")
        axis.axhline(warn, color="orange", linestyle="--", label=f"warn {warn}")
        axis.axhline(alert, color="red", linestyle="--", label=f"alert {alert}")
        axis.set_ylabel("PSI")
        axis.legend()
        axis.set_title("Population Stability Index per feature")
        axis.tick_params(axis="x", labelsize=8)

    return _plot(draw)


# --- sections --------------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_section(status: dict) -> Section:
    turns = status["interactions"]
    return Section("Summary", [
        f"Workspace {status['home']}, base model {status['base_model']}.",
        f"{turns['total']} interactions, {turns['rated']} rated, helpful rate {_pct(turns['helpful_rate'])}.",
        f"Champion: {status['champion'] or 'the base model'}; {len(status['adapters'])} adapter version(s); "
        f"{status['snapshots']} snapshot(s).",
    ])


def adapters_section(status: dict, doc: dict) -> Section:
    section = Section("Adapters and evaluation", chart="eval_accuracy")
    rows = status["adapters"]
    if rows:
        section.table = (["version", "status", "eval accuracy", "general accuracy", "helpful rate", "rated",
                          "final loss"],
                         [[r["version"], r["status"] or "-", _pct(r["eval_accuracy"]), _pct(r["general_accuracy"]),
                           _pct(r["helpful_rate"]), str(r["rated"]), _num(r["final_loss"])] for r in rows])
    else:
        section.text.append("No adapter has been trained yet (run 'cl curate' then 'cl train').")
    points = eval_points(doc)
    if points:
        section.png = eval_chart(points)
    else:
        section.text.append("No evaluation results yet (run 'cl eval'): no accuracy chart.")
    return section


def loss_section(settings: Settings, doc: dict) -> Section:
    section = Section("Training loss", chart="training_loss")
    curves = {a.version: rows for a in registry.adapters(doc) if (rows := loss_history(settings, a))}
    if curves:
        section.png = loss_chart(curves)
        section.text.append("Loss on the assistant tokens per optimizer step, from each adapter's metrics.jsonl.")
    else:
        section.text.append("No training loss history found (no adapter folder has a metrics.jsonl).")
    return section


def helpful_section(status: dict) -> Section:
    section = Section("Helpful rate over time", chart="helpful_rate")
    per_day = status["interactions"]["per_day"]
    if any(d["helpful_rate"] is not None for d in per_day):
        section.png = helpful_chart(per_day)
        section.text.append(f"Rated turns of the last {len(per_day)} days, by the day of the turn.")
    else:
        section.text.append(f"No rated turns in the last {len(per_day)} days: no helpful-rate chart.")
    by_adapter = [(v, c) for v, c in sorted(status["feedback_by_adapter"].items()) if c["rated"]]
    if by_adapter:
        section.table = (["adapter", "rated", "helpful", "helpful rate"],
                         [[v, str(c["rated"]), str(c.get("helpful", 0)), _pct(c["helpful_rate"])] for v,
                          c in by_adapter])
    return section


def drift_section(settings: Settings) -> Section:
    from .drift import check_drift

    section = Section("Drift", chart="drift_psi")
    try:
        result = check_drift(settings, log=False)
    except CLError as exc:
        section.text.append(f"Drift check not possible: {exc.message}.")
        return section
    ref, recent = result["reference"], result["recent"]
    section.text.append(f"Status: {result['status']}. Reference: {ref['kind']} ({ref['n']} turns); "
                        f"recent: last {recent.get('days')} day(s) ({recent['n']} turns).")
    section.text.extend(result["notes"])
    if result["features"]:
        section.table = (["feature", "kind", "PSI", "KS stat", "KS p", "level"],
                         [[f["name"], f["kind"], _num(f.get("psi")), _num(f.get("ks_stat")), _num(f.get("ks_p"), 4),
                           f["level"]]
                          for f in result["features"]])
        if any(f.get("psi") is not None for f in result["features"]):
            section.png = drift_chart(result["features"], settings.drift.psi_warn, settings.drift.psi_alert)
    concept = result["concept"]
    if concept.get("p_value") is not None:
        section.text.append(f"Helpful rate {concept['reference_rate']:.0%} -> {concept['recent_rate']:.0%} "
                            f"({concept['test']}, one-sided p = {concept['p_value']:.4f}): {concept['level']}.")
    return section


def events_section(status: dict) -> Section:
    recent = status["events"]["recent"]
    section = Section("Recent events")
    if recent:
        section.table = (["when", "event", "outcome"],
                         [[(e["at"] or "-")[:19].replace("T", " "), e["event"], e["outcome"]] for e in recent])
    else:
        section.text.append("No learning events yet.")
    return section


def build_sections(settings: Settings) -> list[Section]:
    from .status import collect_status

    status = collect_status(settings, days=HELPFUL_DAYS)
    doc = registry.load(settings)
    return [summary_section(status), adapters_section(status, doc), loss_section(settings, doc),
            helpful_section(status),
            drift_section(settings), events_section(status)]


# --- rendering -------------------------------------------------------------------------------------------
def to_markdown(sections: list[Section], title: str, png_names: dict[str, str]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for sentence in s.text:
            lines += [sentence, ""]
        if s.table:
            header, rows = s.table
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows] + [""]
        if s.png is not None:
            lines += [f"![{s.title}]({png_names[s.chart]})", ""]
    return "\n".join(lines)


def to_html(sections: list[Section], title: str) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}</style>",
        "</head><body>", f"<h1>{esc(title)}</h1>",
    ]
    for s in sections:
        parts.append(f"<h2>{esc(s.title)}</h2>")
        parts += [f"<p>{esc(t)}</p>" for t in s.text]
        if s.table:
            header, rows = s.table
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        if s.png is not None:
            data = base64.b64encode(s.png).decode("ascii")
            parts.append(f"<p><img alt='{esc(s.title)}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(settings: Settings, now: datetime | None = None) -> dict:
    """Write the report; returns the paths written and what was missing."""
    now = now or datetime.now(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    folder = settings.logs_dir / "reports"
    sections = build_sections(settings)
    title = f"cl report {now.isoformat(timespec='seconds').replace('+00:00', 'Z')}"
    png_names = {s.chart: f"report_{stamp}_{s.chart}.png" for s in sections if s.chart and s.png is not None}
    charts = []
    for s in sections:
        if s.png is not None:
            path = folder / png_names[s.chart]
            atomic_write_bytes(path, s.png)
            charts.append(path)
    markdown, page = folder / f"report_{stamp}.md", folder / f"report_{stamp}.html"
    atomic_write_bytes(markdown, to_markdown(sections, title, png_names).encode("utf-8"))
    atomic_write_bytes(page, to_html(sections, title).encode("utf-8"))
    missing = [t for s in sections if s.png is None and s.chart for t in s.text[-1:]]
    return {"html": page, "markdown": markdown, "charts": charts, "missing": missing}
