"""The eval command: plan which version meets which, evaluate both, record the results, run the gate and promote
when it says so."""
from __future__ import annotations

from pathlib import Path

from .. import registry
from ..core.errors import InputError, RegistryError
from ..core.settings import Settings
from ..registry import BASE, label
from .gate import GateRules, gate
from .snapshots import snapshot_eval_path
from .versions import Progress, evaluate_versions


def plan(doc: dict, version: str | None = None, against: str | None = None) -> dict:
    """Which version to evaluate, against which, and whether the gate may promote.

    Defaults: the newest candidate (else the champion, else the base) against the champion (else the base)."""
    if version in (None, ""):
        subject = registry.newest_candidate(doc) or doc["champion"]
    else:
        subject = None if version == BASE else version
    if subject is not None:
        registry.adapter(doc, subject)
    if against is None:
        other, compare = (doc["champion"] if doc["champion"] != subject else None), subject is not None
    elif against == "none":
        other, compare = None, False
    else:
        other = doc["champion"] if against == "champion" else (None if against == BASE else against)
        compare = True
        if other is not None:
            registry.adapter(doc, other)
    if compare and other == subject:
        raise InputError(f"cannot evaluate {label(subject)} against itself", "pick another with --against")
    is_candidate = subject is not None and registry.registered_adapter(doc, subject).status == "candidate"
    gated = compare and is_candidate and other == doc["champion"]
    return {"subject": subject, "against": other, "compare": compare, "gated": gated}


def evaluate_and_gate(
    settings: Settings,
    candidate: str | None = None,
    eval_file: Path | str | None = None,
    promote: bool = True,
    against: str | None = None,
    snapshot: str | None = None,
    include_general: bool = True,
    chat=None,
    progress: Progress | None = None,
) -> dict:
    """Evaluate `candidate` (default: the newest) against the champion or base, store both results, run the
    gate and promote when it says so (unless `promote=False`). Returns a JSON-ready report."""
    doc = registry.load(settings)
    steps = plan(doc, candidate, against)
    if snapshot is None and steps["subject"] is not None:
        snapshot = _own_snapshot(settings, doc, steps["subject"])
    versions = [steps["subject"]] + ([steps["against"]] if steps["compare"] else [])
    known = _training_losses(doc, steps, snapshot)
    known_preference = _training_preference(doc, steps, snapshot)
    rules = gate_rules(settings)

    def wants_general(results: list[dict]) -> bool:  # a candidate the target rules refuse needs no everyday check
        return gate(results[0], results[1], rules).promote

    results = evaluate_versions(settings, versions, eval_file, include_general, snapshot, chat, progress, known,
                                known_preference, wants_general if steps["gated"] and promote else None)
    for result in results:
        registry.record_eval_result(settings, result["version"], result)
    report = {"subject": results[0], "against": results[1] if steps["compare"] else None, "decision": None,
              "promoted": False}
    if steps["gated"]:
        decision = gate(results[0], results[1], rules)
        report["decision"] = decision.to_dict()
        if decision.promote and promote:
            registry.promote_version(settings, steps["subject"], "gate: " + decision.summary,
                                      expected_champion=steps["against"])
            report["promoted"] = True
    report["champion"] = registry.load(settings)["champion"]
    return report


def gate_rules(settings: Settings) -> GateRules:
    cfg = settings.eval
    return GateRules(gain_alpha=cfg.gain_alpha, general_margin=cfg.general_tolerance,
                     general_alpha=cfg.alpha, min_questions=cfg.min_questions, loss_margin=cfg.loss_margin)


def _training_losses(doc: dict, steps: dict, snapshot: str | None) -> dict:
    """Held-out losses the candidate's training run measured on its own snapshot: the trained adapter's, and the
    model it started from (the champion it warm-started from, or the base). Both came from the same 4-bit model,
    so they compare with each other (and are not measured again)."""
    return _measured_in_training(doc, steps, snapshot, "eval_loss", lambda metrics, end: metrics[f"eval_loss{end}"])


def _training_preference(doc: dict, steps: dict, snapshot: str | None) -> dict:
    """The rejected / chosen answers' log-likelihoods the candidate's training run measured (after training, and
    before it for the model it started from), under the same rule as `_training_losses`: both or neither."""

    def figures(metrics: dict, end: str) -> dict:
        shared = {k: metrics.get(k) for k in ("preference_eval", "rejected_answers", "chosen_answers")}
        return {"rejected_loglik": metrics[f"rejected_loglik{end}"],
                "chosen_loglik": metrics.get(f"chosen_loglik{end}"), **shared}

    return _measured_in_training(doc, steps, snapshot, "rejected_loglik", figures)


def _measured_in_training(doc: dict, steps: dict, snapshot: str | None, key: str, figures) -> dict:
    """{version: figures(metrics, "")} for the subject and {started_from: figures(metrics, "_start")} for the model
    it started from, when its training run measured `key` on `snapshot`; empty unless every compared version has
    them (never compare a 4-bit training figure with an eval-time one)."""
    subject = steps["subject"]
    if subject is None or snapshot is None:
        return {}
    entry = registry.registered_adapter(doc, subject)
    metrics = entry.metrics
    if entry.snapshot_id != snapshot or metrics.get(key) is None:
        return {}
    known = {subject: figures(metrics, "")}
    started_from = entry.warm_start_from
    if steps["compare"] and steps["against"] == started_from and metrics.get(f"{key}_start") is not None:
        known[started_from] = figures(metrics, "_start")
    needed = {subject, steps["against"]} if steps["compare"] else {subject}
    return known if needed <= known.keys() else {}


def _own_snapshot(settings: Settings, doc: dict, version: str) -> str | None:
    """The snapshot an adapter was trained on, when its held-out slice is still on disk."""
    snapshot_id = registry.registered_adapter(doc, version).snapshot_id
    if not snapshot_id:
        return None
    try:
        snap = registry.find_snapshot(doc, snapshot_id)
    except RegistryError:
        return None
    return snapshot_id if snapshot_eval_path(settings, snap) else None
