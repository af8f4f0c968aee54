"""The promotion gate (pure): evidence of gain on the target questions (an exact paired sign-flip test on each
question's share of system prompts answered, which is McNemar's exact test when every question scores 0 or 1; the
held-out loss when they are too few), non-inferiority on the everyday questions (a score test), and rejected
answers no more likely."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..registry import UNUSABLE, label

EPSILON = 1e-9


@dataclass(frozen=True)
class GateRules:
    """What the gate asks for (from [eval]): evidence of gain on the target questions, non-inferiority on the
    everyday ones."""

    gain_alpha: float = 0.1  # one-sided exact McNemar on the target questions
    general_margin: float = 0.1  # everyday accuracy may be at most this much lower (non-inferiority margin)
    general_alpha: float = 0.05  # one-sided score test of that margin
    min_questions: int = 5  # fewer target questions: judge the gain on the held-out loss instead
    loss_margin: float = 0.05  # held-out loss must fall by at least this share
    rejected_margin: float = 0.0  # nats per token the rejected answers may grow more likely by (0: not at all)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    stats: dict = field(default_factory=dict)
    summary: str = ""

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reasons": list(self.reasons), "stats": dict(self.stats),
                "summary": self.summary}


def mcnemar_gain(candidate: list[bool], champion: list[bool]) -> tuple[int, int, float]:
    """(wins, losses, one-sided exact p) for "the candidate passes more prompts": the chance of at least `wins`
    successes in wins + losses fair coin flips. 1.0 when nothing differs."""
    from scipy.stats import binomtest

    wins = sum(1 for c, o in zip(candidate, champion) if c and not o)
    losses = sum(1 for c, o in zip(candidate, champion) if o and not c)
    if wins + losses == 0:
        return 0, 0, 1.0
    return wins, losses, float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def sign_flip_gain(candidate: list[float], champion: list[float]) -> tuple[float, float, float]:
    """(gained, lost, one-sided p) for "the candidate scores higher per question", with each question's score in
    [0, 1]: the exact paired permutation test that flips the sign of each question's difference (Monte Carlo with a
    fixed seed beyond 2^16 sign patterns). Under "candidate and champion are exchangeable on every question" the
    differences are symmetric about 0. With scores of 0 and 1 only it is McNemar's exact test."""
    import numpy as np
    from scipy.stats import permutation_test

    diffs = np.array([c - o for c, o in zip(candidate, champion)], dtype=float)
    diffs = diffs[np.abs(diffs) > EPSILON]
    gained, lost = float(diffs[diffs > 0].sum()), float(-diffs[diffs < 0].sum()) + 0.0
    if diffs.size <= 1:  # no pattern, or two (+d and -d): scipy wants two observations
        return gained, lost, 0.5 if gained > 0 else 1.0
    test = permutation_test((diffs,), np.sum, permutation_type="samples", alternative="greater",
                            n_resamples=2 ** 16, rng=np.random.default_rng(0))
    return gained, lost, float(test.pvalue)


def non_inferiority_p(candidate: list[bool], champion: list[bool], margin: float) -> float:
    """One-sided p-value of H0 "the candidate's accuracy is lower by `margin` or more" on paired outcomes
    (Tango's score test, 1998: the restricted maximum-likelihood variance keeps it valid with no discordant pair).
    Small p: evidence that the candidate is no worse than the champion by `margin`."""
    from scipy.stats import norm

    n = len(candidate)
    if n == 0:
        return 1.0
    lost = sum(1 for c, o in zip(candidate, champion) if o and not c)
    won = sum(1 for c, o in zip(candidate, champion) if c and not o)
    same = n - lost - won
    b = lost * (1 - margin) + won * (1 - 3 * margin) - 2 * same * margin  # the restricted MLE's quadratic
    p_won = (b + math.sqrt(b * b + 8 * n * won * margin * (1 - margin))) / (4 * n)
    variance = (2 * p_won + margin - margin * margin) / n
    if variance <= 0:
        return 0.0 if lost - won < n * margin else 1.0
    z = ((lost - won) / n - margin) / math.sqrt(variance)
    return float(norm.cdf(z))


def paired_outcomes(candidate_result: dict, champion_result: dict,
                    key: str | None = None) -> tuple[list[bool], list[bool]] | None:
    """Per-prompt pass/fail of both (of the target items, or of `key`'s items, e.g. "general"), in the same order;
    None when they were not run on the same prompts."""
    mine_part = candidate_result.get(key) if key else candidate_result
    theirs_part = champion_result.get(key) if key else champion_result
    if not mine_part or not theirs_part:
        return None
    theirs = {item["prompt"]: item["passed"] for item in theirs_part["items"]}
    mine = [item["prompt"] for item in mine_part["items"]]
    if len(theirs) != len(mine_part["items"]) or set(mine) != set(theirs):
        return None
    return [item["passed"] for item in mine_part["items"]], [theirs[p] for p in mine]


def gate(candidate_result: dict, champion_result: dict, rules: GateRules = GateRules()) -> Decision:
    """Promote only on evidence of gain on the target questions (or, with too few of them, a clearly lower
    held-out loss) AND non-inferiority on the everyday questions. Tainted or failed candidates never pass."""
    them = label(champion_result.get("version"))
    me = label(candidate_result.get("version"))
    stats: dict[str, Any] = {"against": them}
    if candidate_result.get("status") in UNUSABLE:
        reason = f"candidate is {candidate_result['status']}: it is never promoted"
        return Decision(False, [reason], stats, f"{me} is not promoted: {reason}.")
    paired = paired_outcomes(candidate_result, champion_result)
    if paired is None:
        reason = f"candidate and {them} were evaluated on different prompts: re-run the eval on both"
        return Decision(False, [reason], stats, f"{me} is not promoted: {reason}.")
    gain_ok, gain_text = _gain_rule(candidate_result, champion_result, paired, rules, stats)
    general_ok, general_text = _general_rule(candidate_result, champion_result, rules, stats)
    rejected_ok, rejected_text = _rejected_rule(candidate_result, champion_result, rules, stats)
    promote = gain_ok and general_ok and rejected_ok
    reasons = [gain_text, general_text] + ([rejected_text] if rejected_text else [])
    verdict = f"{me} is promoted over {them}" if promote else f"{me} is not promoted over {them}"
    summary = f"{verdict}: {'; '.join(reasons)}."
    return Decision(promote, reasons, stats, summary[0].upper() + summary[1:])


def paired_scores(candidate_result: dict, champion_result: dict) -> tuple[list[float], list[float], int]:
    """Each target question's score for both, in the candidate's order, and how many system prompts it is over:
    the share of prompts passed when both were asked under the same ones, else 0/1 for the shown answer."""
    prompts = candidate_result.get("system_prompts") or [None]
    same = (champion_result.get("system_prompts") or [None]) == prompts

    def score(item: dict) -> float:
        return float(item.get("score", item["passed"]) if same else item["passed"])

    theirs = {item["prompt"]: score(item) for item in champion_result["items"]}
    mine = candidate_result["items"]
    return [score(i) for i in mine], [theirs[i["prompt"]] for i in mine], len(prompts) if same else 1


def _gain_rule(cand: dict, champ: dict, paired, rules: GateRules, stats: dict) -> tuple[bool, str]:
    wins, losses, _ = mcnemar_gain(*paired)
    mine, theirs, over = paired_scores(cand, champ)
    gained, lost, p = sign_flip_gain(mine, theirs)
    total = len(paired[0])
    stats.update(accuracy=cand["accuracy"], against_accuracy=champ["accuracy"], wins=wins, losses=losses,
                 gained=round(gained, 4), lost=round(lost, 4), system_prompts=over,
                 gain_p_value=p, gain_alpha=rules.gain_alpha, target_questions=total)
    score = f"it answers {cand['passed']} of {total} target questions against {champ['passed']}"
    if total >= rules.min_questions:
        ok = gained > lost and p <= rules.gain_alpha
        if over > 1:
            score += (f" (asked under {over} system prompts: {sum(mine):.3g} against {sum(theirs):.3g} question-"
                      "shares)")
            test = f"{gained:.3g} gained, {lost:.3g} lost, one-sided exact paired sign-flip test p = {p:.3g}"
        else:
            test = f"{wins} gained, {losses} lost, one-sided exact McNemar p = {p:.3g}"
        verdict = "a significant gain" if ok else "no significant gain"
        return ok, f"{score} ({test}: {verdict} at {rules.gain_alpha:g})"
    mine, theirs = cand.get("eval_loss"), champ.get("eval_loss")
    if mine is None or theirs is None:
        return False, (f"{score}, too few to show a gain (fewer than {rules.min_questions}) "
                       "and no held-out loss to judge by")
    stats.update(eval_loss=mine, against_eval_loss=theirs, loss_margin=rules.loss_margin)
    ok = losses == 0 and mine <= theirs * (1 - rules.loss_margin)
    change = f"held-out loss {theirs:.3f} -> {mine:.3f}"
    verdict = "a clear gain" if ok else f"not a gain of at least {rules.loss_margin:.0%} without lost questions"
    return ok, f"{score}, too few for a test, so the held-out loss decides: {change}, {verdict}"


def _rejected_rule(cand: dict, champ: dict, rules: GateRules, stats: dict) -> tuple[bool, str | None]:
    """Answers users rated unhelpful must not have become more likely than under the champion (no text when
    there were none to measure)."""
    mine, theirs = cand.get("rejected_loglik"), champ.get("rejected_loglik")
    if mine is None or theirs is None:
        return True, None
    stats.update(rejected_loglik=mine, against_rejected_loglik=theirs, rejected_margin=rules.rejected_margin)
    ok = mine <= theirs + rules.rejected_margin + EPSILON
    change = f"rejected answers' mean log-likelihood {theirs:.3f} -> {mine:.3f} nats/token"
    return ok, f"{change} ({'no more likely' if ok else 'MORE likely: what users rejected came back'})"


def _general_rule(cand: dict, champ: dict, rules: GateRules, stats: dict) -> tuple[bool, str]:
    paired = paired_outcomes(cand, champ, "general")
    if paired is None and cand.get("general_skipped"):  # never promote without the check
        return False, "its everyday questions were not asked, since the rules above already refuse it"
    if paired is None:
        return True, "the everyday set was not evaluated on both, so forgetting was not checked"
    mine, theirs = paired
    p = non_inferiority_p(mine, theirs, rules.general_margin)
    kept = sum(mine)
    stats.update(general_accuracy=cand.get("general_accuracy"), against_general_accuracy=champ.get("general_accuracy"),
                 general_p_value=p, general_margin=rules.general_margin, general_alpha=rules.general_alpha,
                 general_lost=sum(1 for c, o in zip(mine, theirs) if o and not c))
    ok = p <= rules.general_alpha
    verdict = "non-inferior" if ok else "not shown non-inferior"
    return ok, (f"on {len(mine)} everyday questions it keeps {kept} against {sum(theirs)} ({verdict} within "
                f"{rules.general_margin:.0%}: score test p = {p:.3g}, alpha {rules.general_alpha:g})")
