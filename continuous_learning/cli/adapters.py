"""`cl adapters`: the adapter versions, one adapter's lineage, and export for llama.cpp / Ollama."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .evaluation import clip
from .progress import dim_line
from .support import console, print_json, settings_from

adapters_app = typer.Typer(
    help="List adapter versions; 'show VERSION' for one's lineage; 'export VERSION' for llama.cpp / Ollama.",
    no_args_is_help=False,
)


def register(app: typer.Typer) -> None:
    """Add the `cl adapters` group to the `cl` app."""
    app.add_typer(adapters_app, name="adapters")



def _adapter_rows(doc: dict) -> list[dict]:
    from ..registry import adapters_by_version

    rows = []
    for entry in adapters_by_version(doc):
        last = entry.latest_eval
        rows.append({
            "version": entry.version,
            "status": entry.status,
            "champion": doc["champion"] == entry.version,
            "accuracy": last.get("accuracy") if last else None,
            "general_accuracy": last.get("general_accuracy") if last else None,
            "created_at": entry.created_at,
            "note": entry.note,
        })
    return rows


@adapters_app.callback(invoke_without_command=True)
def adapters_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Adapter versions with status and latest eval scores; the champion is marked with *."""
    if ctx.invoked_subcommand:
        return
    from .. import registry

    doc = registry.load(settings_from(ctx))
    rows = _adapter_rows(doc)
    if as_json:
        print_json({"champion": doc["champion"], "adapters": rows})
        return
    if not rows:
        console.print("no adapters yet: train one with 'cl train'")
        return
    table = Table("", "version", "status", "accuracy", "general", "created", "note")
    for row in rows:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.0%}"
        gen = "-" if row["general_accuracy"] is None else f"{row['general_accuracy']:.0%}"
        table.add_row("*" if row["champion"] else "", row["version"], row["status"], acc, gen,
                      (row["created_at"] or "")[:19], clip(row["note"] or "", 40))
    console.print(table)
    if doc["champion"] is None:
        console.print("[dim]no champion: the base model is serving[/dim]")


@adapters_app.command("show")
def adapters_show_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Adapter version."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One adapter's lineage: base model, snapshot, parent chain, hyperparameters, metrics and evals."""
    from .. import registry
    from ..registry import adapter

    doc = registry.load(settings_from(ctx))
    entry = adapter(doc, version)
    chain = _adapter_parents(doc, version)
    if as_json:
        print_json({**entry, "champion": doc["champion"] == version, "parent_chain": chain})
        return
    _adapter_print_lineage(entry, chain, doc["champion"] == version)


@adapters_app.command("export")
def adapters_export_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Adapter version, 'champion' or 'base'."),
    formats: list[str] | None = typer.Option(
        None, "--format", "-f", help="gguf-lora, gguf-merged or hf-merged; repeat for several (default: all)."),
    quants: list[str] | None = typer.Option(
        None, "--quant", help="Merged GGUF type f16 or q8_0; repeat for both (default: both)."),
    out: Path | None = typer.Option(None, "--out", help="Folder to write (default: exports/<version>/ in the "
                                                        "workspace)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Export for llama.cpp / Ollama (GGUF LoRA + F16 base, merged GGUF) and as a merged Hugging Face folder."""
    from ..export import DEFAULT_QUANTS, FORMATS, export_model

    settings = settings_from(ctx)
    result = export_model(settings, version, formats=tuple(formats or FORMATS),
                          quants=tuple(quants or DEFAULT_QUANTS), out=out, progress=None if as_json else dim_line)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"exported {result.label} on {result.base_name} to {result.folder} in {result.seconds:.0f} s")
    for item in result.files:
        console.print(f"  {item.kind:<12} {item.bytes / 1e6:8.1f} MB  {item.path.name}")
    console.print("use it with:")
    for line in result.commands:
        console.print(f"  {line}", markup=False, soft_wrap=True)


def _adapter_parents(doc: dict, version: str) -> list[str]:
    from ..registry import adapter_view, registered_adapter

    chain, seen = [], {version}
    parent = registered_adapter(doc, version).parent
    while parent and parent not in seen:
        chain.append(parent)
        seen.add(parent)
        view = adapter_view(doc, parent)
        parent = view.parent if view is not None else None
    return chain


def _adapter_pairs(data: dict | None) -> str:
    return ", ".join(f"{k}={escape(str(v))}" for k, v in (data or {}).items()) or "-"


def _adapter_print_lineage(entry: dict, chain: list[str], is_champion: bool) -> None:
    base, snap = entry.get("base_model") or {}, entry.get("snapshot") or {}
    status = entry["status"] + (" (champion)" if is_champion and entry["status"] != "champion" else "")
    console.print(f"[bold]adapter {entry['version']}[/bold]  {status}  created {entry.get('created_at', '-')}")
    console.print(f"  path:            {entry.get('path', '-')}")
    console.print(f"  note:            {clip(entry.get('note') or '-', 200)}")
    console.print(f"  base model:      {base.get('name', '-')} (sha256 {str(base.get('sha256', '-'))[:12]})")
    console.print(f"  snapshot:        {snap.get('id', '-')} (sha256 {str(snap.get('sha256', '-'))[:12]})")
    console.print(f"  lineage:         {' <- '.join([entry['version'], *chain, 'base'])}")
    console.print(f"  hyperparameters: {_adapter_pairs(entry.get('hyperparameters'))}")
    scalars = {k: v for k, v in (entry.get("metrics") or {}).items() if not isinstance(v, (list, dict))}
    console.print(f"  metrics:         {_adapter_pairs(scalars)}")
    console.print(f"  libraries:       {_adapter_pairs(entry.get('library_versions'))}")
    console.print(f"  files:           "
                  f"{_adapter_pairs({k: str(v)[:12] for k, v in (entry.get('sha256') or {}).items()})}")
    evals = entry.get("evals") or []
    if not evals:
        console.print("  evals:           none yet (run 'cl eval')")
        return
    table = Table("when", "eval file", "accuracy", "general", "eval loss", "tokens/s", title="evals")
    for e in evals:
        general = "-" if e.get("general_accuracy") is None else f"{e['general_accuracy']:.0%}"
        loss = "-" if e.get("eval_loss") is None else f"{e['eval_loss']:.3f}"
        tps = "-" if e.get("tokens_per_s") is None else f"{e['tokens_per_s']:.1f}"
        table.add_row(str(e.get("created_at", ""))[:19], (e.get("eval_file") or {}).get("path", "-"),
                      f"{e.get('passed')}/{e.get('total')}", general, loss, tps)
    console.print(table)


