"""Champion health: after a promotion, compare the champion's helpful rate in the chat with its predecessor's
and roll back automatically when it is significantly and substantially worse.

`health_decision` is pure; `check_health` reads the logs and the registry, acts, and logs `health_check`
(every run) and `health_rollback` (when it rolled back).
"""
from __future__ import annotations

from .. import registry
from ..core.settings import HealthConfig, Settings
from ..registry import BASE, UNUSABLE, champion_lineage, label, rollback_champion
from .ab import Tally, rated_tallies, two_proportion_z

OK, DEGRADED, INSUFFICIENT, NO_CHAMPION = "ok", "degraded", "insufficient", "no_champion"


def health_decision(champion: Tally, predecessor: Tally, config: HealthConfig) -> dict:
    """Verdict on the champion against its predecessor: ok, degraded or insufficient (too few rated turns).

    Degraded = both have >= min_samples rated turns, champion rate < degradation_factor x predecessor rate,
    and the one-sided two-proportion test (champion < predecessor) gives p < alpha."""
    _, p = two_proportion_z(champion.helpful, champion.rated, predecessor.helpful, predecessor.rated,
                            alternative="less")
    figures = {"champion_stats": champion.to_dict(), "predecessor_stats": predecessor.to_dict(), "p_value": p,
               "alpha": config.alpha, "degradation_factor": config.degradation_factor,
               "min_samples": config.min_samples}
    short = [f"{who} has {t.rated} rated turn(s), needs {config.min_samples}"
             for who, t in (("champion", champion), ("predecessor", predecessor)) if t.rated < config.min_samples]
    if short:
        return {"verdict": INSUFFICIENT, "reasons": short, **figures}
    threshold = config.degradation_factor * predecessor.rate
    reasons = []
    below = champion.rate < threshold
    reasons.append(f"helpful rate {champion.rate:.1%} vs predecessor {predecessor.rate:.1%} "
                   f"({'below' if below else 'not below'} {config.degradation_factor:g} x = {threshold:.1%})")
    significant = p < config.alpha
    reasons.append(f"one-sided test p={p:.3g} ({'significant' if significant else 'not significant'} at "
                   f"alpha={config.alpha:g})")
    return {"verdict": DEGRADED if below and significant else OK, "reasons": reasons, **figures}


def check_health(settings: Settings, apply: bool = True) -> dict:
    """Judge the champion; roll back to its predecessor when degraded and `health.auto_rollback` is on (and `apply`)."""
    doc = registry.load(settings)
    champion = doc["champion"]
    if champion is None:
        report = {"verdict": NO_CHAMPION, "champion": None, "predecessor": None, "rolled_back": False,
                  "reasons": ["the base model is serving: nothing to judge"]}
        registry.log_event(settings, "health_check", verdict=NO_CHAMPION, champion=None)
        return report
    predecessor = champion_lineage(doc)[0]
    tallies = rated_tallies(settings, lambda i: label(i.adapter_version)
                            if i.adapter_version in (champion, predecessor) else None)
    decision = health_decision(tallies.get(champion, Tally()), tallies.get(label(predecessor), Tally()),
                               settings.health)
    report = {**decision, "champion": champion, "predecessor": predecessor, "rolled_back": False,
              "auto_rollback": settings.health.auto_rollback}
    if decision["verdict"] == DEGRADED:
        if not settings.health.auto_rollback:
            report["reasons"].append("auto-rollback is off (health.auto_rollback): roll back by hand with 'cl "
                                     "rollback'")
        elif not apply:
            report["reasons"].append("check only: nothing was rolled back")
        else:
            report["rolled_back"] = _roll_back(settings, champion, predecessor, decision)
    registry.log_event(settings, "health_check", verdict=decision["verdict"], champion=champion,
                       predecessor=predecessor,
                       rolled_back=report["rolled_back"],
                       **_figures(decision))
    return report


def _roll_back(settings: Settings, champion: str, predecessor: str | None, decision: dict) -> bool:
    why = f"health: {champion} degraded against {label(predecessor)}: " + "; ".join(decision["reasons"])
    doc = registry.load(settings)
    if doc["champion"] != champion:  # someone moved it meanwhile: their decision stands
        return False
    status = registry.registered_adapter(doc, predecessor).status if predecessor is not None else "base"
    if status in UNUSABLE:
        decision["reasons"].append(f"predecessor {predecessor} is {status}: choose a target with 'cl rollback --to "
                                   f"VERSION'")
        return False
    moved = rollback_champion(settings, to=predecessor if predecessor is not None else BASE, reason=why)
    registry.log_event(settings, "health_rollback", **{"from": moved["from"], "to": moved["to"]}, reason=why,
                       **_figures(decision))
    return True


def _figures(decision: dict) -> dict:
    champion, predecessor = decision["champion_stats"], decision["predecessor_stats"]
    return {"champion_rated": champion["rated"], "champion_rate": champion["helpful_rate"],
            "predecessor_rated": predecessor["rated"],
            "predecessor_rate": predecessor["helpful_rate"], "p_value": decision["p_value"]}
