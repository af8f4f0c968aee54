"""`cl` commands for A/B tests, champion health, cycles and schedules."""
from __future__ import annotations

import typer
from rich.markup import escape

from .support import console, err_console, print_json, settings_from

ab_app = typer.Typer(help="A/B-test a candidate adapter on a share of new chat sessions.", no_args_is_help=True)
schedule_app = typer.Typer(help="Run 'cl cycle' on a schedule (crontab, or systemd user timers with --systemd).",
                           no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cl` app."""
    app.add_typer(ab_app, name="ab")
    app.add_typer(schedule_app, name="schedule")
    app.command("health")(health_cmd)
    app.command("cycle")(cycle_cmd)


# --- A/B tests -------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _print_ab(report: dict) -> None:
    from ..monitor.ab import CANDIDATE, CHAMPION

    test, stats = report["test"], report["stats"]
    console.print(f"A/B test {test['id']} ({test['status']}): candidate {test['candidate']} vs champion "
                  f"{test['champion'] or 'base'}, {test['traffic']:.0%} of new sessions, since {test['started_at']}",
                  markup=False)
    for arm in (CHAMPION, CANDIDATE):
        s = stats[arm]
        console.print(f"  {arm:<9} rated {s['rated']:>5}  helpful {s['helpful']:>5}  rate {_pct(s['helpful_rate'])}",
                      markup=False)
    low, high = stats["ci95"]
    console.print(f"  difference {stats['difference'] * 100:+.1f} points, 95% CI [{low * 100:+.1f}, "
                  f"{high * 100:+.1f}], "
                  f"z={stats['z']:.2f}, p={stats['p_value']:.3g}", markup=False)
    for warning in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


@ab_app.command("start")
def ab_start_cmd(
    ctx: typer.Context,
    candidate: str = typer.Argument(..., help="Adapter version answering the candidate share."),
    traffic: float | None = typer.Option(None, "--traffic", help="Share of new chat sessions for the candidate "
                                                                 "(default ab.traffic)."),
) -> None:
    """Start an A/B test: a share of NEW chat sessions is answered by CANDIDATE (sticky per session)."""
    from ..monitor.ab import start_test

    test = start_test(settings_from(ctx), candidate, traffic)
    console.print(f"A/B test {test['id']} started: {test['traffic']:.0%} of new chat sessions answered by {candidate}, "
                  f"the rest by {test['champion'] or 'the base model'}", markup=False)


@ab_app.command("status")
def ab_status_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Rated turns and helpful rate per arm, the difference with its 95% CI and the z-test p-value."""
    from ..monitor.ab import status_report

    report = status_report(settings_from(ctx))
    if as_json:
        print_json(report)
        return
    _print_ab(report)
    verdict = "would promote" if report["would_promote"] else "would not promote"
    console.print(f"'cl ab stop --promote' {verdict}: " + "; ".join(report["reasons"]), markup=False)


@ab_app.command("stop")
def ab_stop_cmd(
    ctx: typer.Context,
    promote: bool = typer.Option(False, "--promote", help="Promote the candidate if the promotion criteria hold."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Stop the running A/B test (with --promote: promote the candidate when it is significantly better)."""
    from ..monitor.ab import stop_test

    report = stop_test(settings_from(ctx), promote=promote)
    if as_json:
        print_json(report)
        return
    _print_ab(report)
    test = report["test"]
    if report["promoted"]:
        console.print(f"stopped; promoted {test['candidate']}: " + "; ".join(report["reasons"]), markup=False)
    elif promote:
        console.print(f"stopped without promoting {test['candidate']}: " + "; ".join(report["reasons"]), markup=False)
    else:
        console.print("stopped (nothing promoted; use --promote to promote a winner)", markup=False)


# --- health ----------------------------------------------------------------------------------------------
def health_cmd(
    ctx: typer.Context,
    check_only: bool = typer.Option(False, "--check-only", help="Judge, but never roll back."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Compare the champion's helpful rate with its predecessor's; roll back if it degraded significantly."""
    from ..monitor.health import check_health

    report = check_health(settings_from(ctx), apply=not check_only)
    if as_json:
        print_json(report)
        return
    if report["champion"] is None:
        console.print("health: " + "; ".join(report["reasons"]), markup=False)
        return
    pred, champ = report["predecessor_stats"], report["champion_stats"]
    console.print(f"champion {report['champion']}: {champ['rated']} rated, helpful {_pct(champ['helpful_rate'])}; "
                  f"predecessor {report['predecessor'] or 'base'}: {pred['rated']} rated, helpful "
                  f"{_pct(pred['helpful_rate'])}", markup=False)
    console.print(f"verdict: {report['verdict']} - " + "; ".join(report["reasons"]), markup=False)
    if report["rolled_back"]:
        console.print(f"[red]rolled back[/red]: champion is now {escape(report['predecessor'] or 'base')}")


# --- cycle -----------------------------------------------------------------------------------------------
def cycle_cmd(
    ctx: typer.Context,
    only: str | None = typer.Option(None, "--only", help="Comma-separated steps: curate,train,eval,drift,ab,health."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what is due; change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One pass of everything due: curate, train+eval+gate, full eval, drift, A/B status, champion health."""
    from ..loop.cycle import parse_steps, plan_cycle, run_cycle

    settings = settings_from(ctx)
    steps = parse_steps(only)
    if dry_run:
        plans = plan_cycle(settings, steps)
        if as_json:
            print_json([{"step": p.step, "due": p.due, "reason": p.reason} for p in plans])
            return
        for p in plans:
            console.print(f"{p.step:<7} {'due' if p.due else 'not due':<8} {p.reason}", markup=False)
        return
    say = None if as_json else (lambda line: console.print(f"[dim]{escape(line)}[/dim]"))
    result = run_cycle(settings, steps, say)
    if as_json:
        print_json(result)
    elif result["nothing_due"]:
        console.print("nothing due: " + "; ".join(f"{o['step']}: {o['reason']}" for o in result["outcomes"]),
                      markup=False)
    else:
        for o in result["outcomes"]:
            if o["status"] != "skipped":
                console.print(f"{o['step']:<7} {o['status']:<7} {o['summary']}", markup=False)
        console.print(f"report: {result['report']}", markup=False)
    if result["failed"]:
        raise typer.Exit(1)


# --- schedule --------------------------------------------------------------------------------------------
@schedule_app.command("install")
def schedule_install_cmd(
    ctx: typer.Context,
    systemd: bool = typer.Option(False, "--systemd", help="Systemd user timers instead of the crontab."),
) -> None:
    """Install the cadence of [cycle] (daily curate, weekly train, monthly eval) for this workspace."""
    from ..loop import schedule

    settings = settings_from(ctx)
    if systemd:
        written, warnings = schedule.install_systemd(settings)
        for path in written:
            console.print(f"wrote {path}", markup=False)
        for warning in warnings:
            err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        return
    block = schedule.install_cron(settings)
    console.print("installed in your crontab:\n" + block, markup=False, end="")


@schedule_app.command("show")
def schedule_show_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print what is installed for this workspace (crontab block, systemd units)."""
    from ..loop import schedule

    info = schedule.show(settings_from(ctx))
    if as_json:
        print_json(info)
        return
    console.print("cadence (settings [cycle]):\n  " + "\n  ".join(info["jobs"]), markup=False)
    if info["crontab"]:
        console.print("crontab:\n" + info["crontab"], markup=False, end="")
    else:
        console.print("crontab: nothing installed" + (f" ({info['crontab_error']})" if info["crontab_error"] else ""),
                      markup=False)
    if info["systemd_units"]:
        for name, text in info["systemd_units"].items():
            calendar = next((line for line in text.splitlines() if line.startswith("OnCalendar=")), "")
            console.print(f"systemd: {name} {calendar}".rstrip(), markup=False)
    else:
        console.print("systemd: no units installed", markup=False)


@schedule_app.command("remove")
def schedule_remove_cmd(
    ctx: typer.Context,
    systemd: bool = typer.Option(False, "--systemd", help="Remove the systemd user timers instead of the crontab "
                                                          "lines."),
) -> None:
    """Remove this workspace's schedule (only our lines / units; everything else is kept)."""
    from ..loop import schedule

    settings = settings_from(ctx)
    if systemd:
        removed, warnings = schedule.remove_systemd(settings)
        for warning in warnings:
            err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        console.print(f"removed {len(removed)} unit file(s)" if removed else "no systemd units installed for this "
                                                                             "workspace", markup=False)
        return
    found = schedule.remove_cron(settings)
    console.print("removed this workspace's crontab lines" if found else "nothing installed in the crontab for this "
                                                                         "workspace", markup=False)
