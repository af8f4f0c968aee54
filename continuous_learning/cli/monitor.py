"""`cl` commands for status, report and drift: parse, call, render."""
from __future__ import annotations

import typer

from .support import console, print_json, settings_from

LEVEL_STYLE = {"ok": "green", "warn": "yellow", "alert": "red", "insufficient": "dim"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cl` app."""
    app.command("drift")(drift_command)
    app.command("status")(status_command)
    app.command("report")(report_command)


# --- cl drift ---------------------------------------------------------------------------------------------
def drift_command(
    ctx: typer.Context,
    reference: str | None = typer.Option(None, "--reference", help="'champion' (its training data) or "
                                                                   "YYYY-MM-DD..YYYY-MM-DD"),
    recent_days: int | None = typer.Option(None, "--recent-days", help="Recent window: the last N days"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
) -> None:
    """Compare recent traffic with the champion's training data.

    Exit 0 = no drift (or too little data), 1 = warn, 2 = alert."""
    from ..monitor.drift import check_drift

    settings = settings_from(ctx, drift={"reference": reference, "recent_days": recent_days})
    result = check_drift(settings)
    if as_json:
        print_json(result)
    else:
        render_drift(result)
    raise typer.Exit(result["exit_code"])


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_drift(result: dict) -> None:
    from rich.table import Table

    ref, recent = result["reference"], result["recent"]
    console.print(f"reference: {_window_label(ref)}  ({ref['n']} turns, {ref['rated']} rated)")
    console.print(f"recent:    last {recent.get('days')} day(s)  ({recent['n']} turns, {recent['rated']} rated)")
    if ref.get("note"):
        console.print(f"[dim]{ref['note']}[/dim]")
    if result["features"]:
        table = Table(show_edge=False)
        for column in ("feature", "kind", "PSI", "KS stat", "KS p", "level"):
            table.add_column(column)
        for f in result["features"]:
            level = f["level"]
            table.add_row(f["name"], f["kind"], _num(f.get("psi")), _num(f.get("ks_stat")), _num(f.get("ks_p"), 4),
                          f"[{LEVEL_STYLE[level]}]{level}[/]")
        console.print(table)
    concept = result["concept"]
    if concept.get("p_value") is not None:
        console.print(
            f"helpful rate: {concept['reference_rate']:.0%} -> {concept['recent_rate']:.0%} "
            f"({concept['test']}, one-sided p = {concept['p_value']:.4f}) "
            f"[{LEVEL_STYLE[concept['level']]}]{concept['level']}[/]"
        )
    elif result["features"]:
        console.print(f"helpful rate: [dim]{concept.get('note', 'not enough rated turns')}[/dim]")
    for note in result["notes"]:
        console.print(f"[dim]{note}[/dim]")
    status = result["status"]
    console.print(f"drift: [{LEVEL_STYLE[status]}]{status}[/]" + (" (exit 0: no verdict)" if status == "insufficient"
                                                                  else ""))


def _window_label(window: dict) -> str:
    if window["kind"] == "champion":
        return f"champion {window['champion']}'s training data (snapshots {', '.join(window['snapshots'])})"
    if window["kind"] == "range":
        return f"{window['spec']}"
    return "interactions before the recent window"


# --- cl status --------------------------------------------------------------------------------------------
def status_command(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON"),
    days: int = typer.Option(14, "--days", min=1, max=365, help="Days shown in the per-day figures"),
) -> None:
    """One screen: traffic, feedback, adapters, recent events, drift, A/B test, disk use."""
    from ..monitor.status import collect_status

    status = collect_status(settings_from(ctx), days=days)
    if as_json:
        print_json(status)
        return
    render_status(status)


def _rate(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def feedback_chart(per_day: list[dict], width: int = 72, height: int = 12) -> str | None:
    """Turns per day and helpful rate per day as a plotext chart (plain text), or None without rated turns."""
    import plotext

    rated_days = [(i + 1, d["helpful_rate"]) for i, d in enumerate(per_day) if d["helpful_rate"] is not None]
    if not rated_days:
        return None
    figure = plotext.figure
    figure.clear()
    figure.theme("colorless")
    figure.plot_size(width, height)
    line = figure.signal([x for x, _ in rated_days], [y for _, y in rated_days])
    line.label("helpful rate")
    line.lines(True)
    figure.draw(line)
    figure.ruler("y").lim(0, 1)
    n = len(per_day)
    positions = sorted({1, (n + 1) // 2, n})
    figure.ruler("x").ticks(positions, [per_day[p - 1]["day"][5:] for p in positions])
    figure.title("helpful rate of rated turns, per day")
    return plotext.uncolorize(str(figure.build())).rstrip()


def render_status(status: dict) -> None:
    from rich.table import Table

    from ..monitor.status import human_bytes

    turns = status["interactions"]
    console.print(f"[bold]workspace[/bold] {status['home']}   base model {status['base_model']}")
    console.print(f"interactions: {turns['total']} in total, {turns['rated']} rated, helpful rate "
                  f"{_rate(turns['helpful_rate'])}")
    per_day = turns["per_day"]
    console.print("per day: " + "  ".join(f"{d['day'][5:]} {d['turns']}" for d in per_day), soft_wrap=True)
    chart = feedback_chart(per_day)
    console.print(chart if chart else "[dim]no rated turns in these days: no feedback chart[/dim]", markup=False
                  if chart else True,
                  highlight=False)
    _render_adapters(status, Table)
    _render_events(status, Table)
    drift = status["drift"]
    console.print("drift: " + (f"{drift['outcome']} at {drift['at']}" if drift else "[dim]never checked (run 'cl "
                                                                                    "drift')[/dim]"))
    ab = status["ab_test"]
    if ab:
        arms = "; ".join(f"{arm} {c['turns']} turns, {c['rated']} rated, helpful {_rate(c['helpful_rate'])}" for arm,
                         c in ab["arms"].items())
        console.print(f"A/B test {ab.get('id')}: {ab.get('status')}, candidate {ab.get('candidate')} vs champion "
                      f"{ab.get('champion') or 'base'}, traffic {ab.get('traffic')}, since {ab.get('started_at')}"
                      + (f" - {arms}" if arms else " - no turns yet"))
    else:
        console.print("A/B test: [dim]none[/dim]")
    disk = status["disk"]
    console.print("disk: " + ", ".join(f"{name.replace('_', ' ')} {human_bytes(size)}" for name, size in disk.items()))
    for note in status["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


def _render_adapters(status: dict, Table) -> None:
    rows = status["adapters"]
    console.print(f"champion: [bold]{status['champion'] or 'base model'}[/bold]   snapshots: {status['snapshots']}   "
                  f"base model helpful rate: {_rate(status['base_helpful_rate'])}")
    if not rows:
        console.print("[dim]no adapters yet (run 'cl curate' then 'cl train')[/dim]")
        return
    table = Table(show_edge=False)
    for column in ("version", "status", "eval acc", "general acc", "helpful rate", "rated", "final loss", "snapshot"):
        table.add_column(column)
    for r in rows:
        faded = r["status"] in ("archived", "failed", "tainted")
        style = "bold green" if r["status"] == "champion" else "dim" if faded else ""
        table.add_row(r["version"], r["status"], _rate(r["eval_accuracy"]), _rate(r["general_accuracy"]),
                      _rate(r["helpful_rate"]),
                      str(r["rated"]), _num(r["final_loss"]), r["snapshot"] or "-", style=style)
    console.print(table)


def _render_events(status: dict, Table) -> None:
    latest = status["events"]["latest"]
    if not latest:
        console.print("[dim]no curate/train/eval/cycle events yet[/dim]")
        return
    table = Table(show_edge=False, title="latest events")
    for column in ("event", "when", "outcome"):
        table.add_column(column)
    for kind, event in sorted(latest.items(), key=lambda kv: kv[1]["at"] or ""):
        table.add_row(kind, (event["at"] or "-")[:19].replace("T", " "), event["outcome"])
    console.print(table)


# --- cl report --------------------------------------------------------------------------------------------
def report_command(ctx: typer.Context) -> None:
    """Write an HTML + Markdown report with charts into logs/reports/ and print its path."""
    from ..monitor.report import write_report

    result = write_report(settings_from(ctx))
    for note in result["missing"]:
        console.print(f"[dim]{note}[/dim]")
    console.print(str(result["html"]))
    console.print(str(result["markdown"]))
