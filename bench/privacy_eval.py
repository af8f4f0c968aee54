"""Measuring a sanitizer on the labelled corpora in tests/data: leaks and recall per kind, precision per
placeholder kind, domain-identifier survival. `python -m bench.privacy_eval` prints the figures for ours."""
from __future__ import annotations

import re
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
TUNING, DEV, HELDOUT = DATA / "privacy_tuning.jsonl", DATA / "privacy_dev.jsonl", DATA / "privacy_heldout.jsonl"
DOMAIN = DATA / "domain_ids.jsonl"
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]{2,})>")
SECRET_KINDS = {"API_KEY", "ACCESS_TOKEN", "PRIVATE_KEY", "PASSWORD", "SECRET"}


def load(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def leaked(value: str, kind: str, output: str) -> bool:
    """A value leaks if it is still in the output; names leak by any of their words, long numbers by their digits."""
    if value in output:
        return True
    digits = re.sub(r"\D", "", value)
    if len(digits) >= 7 and digits in re.sub(r"\D", "", output):
        return True
    if kind == "PERSON":
        words = {w for w in re.findall(r"[^\W\d_]+", output)}
        return any(part in words for part in re.findall(r"[^\W\d_]+", value) if len(part) >= 2)
    return False


def redactions(original: str, output: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) in `original` of each placeholder in `output` (the rest of the text is unchanged)."""
    pieces = PLACEHOLDER.split(output)
    literals, kinds = pieces[0::2], pieces[1::2]
    if not kinds:
        return []
    pattern = "".join(re.escape(lit) + ("(.+?)" if i < len(kinds) else "") for i, lit in enumerate(literals))
    match = re.fullmatch(pattern, original, re.DOTALL)
    if match is None:
        return [(kind, 0, 0) for kind in kinds]
    return [(kind, match.start(i + 1), match.end(i + 1)) for i, kind in enumerate(kinds)]


def _value_spans(row: dict) -> list[tuple[int, int]]:
    spans = []
    for item in row["values"]:
        spans += [(m.start(), m.end()) for m in re.finditer(re.escape(item["value"]), row["text"])]
    return spans


def evaluate(rows: list[dict], outputs: list[str]) -> dict:
    """Per labelled kind: values, leaked, recall (with the leaked values); per placeholder kind: precision."""
    by_kind: dict[str, dict] = {}
    predicted: dict[str, list[int]] = {}
    kept = total_keep = 0
    for row, out in zip(rows, outputs):
        for item in row["values"]:
            entry = by_kind.setdefault(item["kind"], {"values": 0, "leaked": 0, "missed": []})
            entry["values"] += 1
            if leaked(item["value"], item["kind"], out):
                entry["leaked"] += 1
                entry["missed"].append(item["value"])
        truth = _value_spans(row)
        for kind, start, end in redactions(row["text"], out):
            hit = any(start < e and s < end for s, e in truth)
            predicted.setdefault(kind, [0, 0])[0 if hit else 1] += 1
        total_keep += len(row["keep"])
        kept += sum(k in out for k in row["keep"])
    for entry in by_kind.values():
        entry["recall"] = round(1 - entry["leaked"] / entry["values"], 4)
        entry["missed"] = entry["missed"][:8]
    precision = {k: {"redacted": tp + fp, "precision": round(tp / (tp + fp), 4)} for k, (tp, fp) in predicted.items()}
    return {"recall": dict(sorted(by_kind.items())), "precision": dict(sorted(precision.items())),
            "keep": total_keep, "kept": kept, "survival": round(kept / total_keep, 4) if total_keep else None}


def summary(result: dict) -> dict:
    """Leak counts in the issue's three classes: secrets and structured PII (target 0), names (target <= 10%)."""
    recall = result["recall"]
    names = recall.get("PERSON", {"values": 0, "leaked": 0})
    structured = [v for k, v in recall.items() if k != "PERSON"]
    return {
        "structured_values": sum(v["values"] for v in structured),
        "structured_leaked": sum(v["leaked"] for v in structured),
        "names": names["values"], "names_leaked": names["leaked"],
        "names_leak_rate": round(names["leaked"] / names["values"], 4) if names["values"] else 0.0,
    }


def ours(paths=(TUNING, DEV, HELDOUT, DOMAIN)) -> dict:
    from continuous_learning.capture.privacy import get_sanitizer
    from continuous_learning.core.settings import PrivacyConfig

    sanitizer = get_sanitizer(PrivacyConfig()).load()
    report = {}
    for path in paths:
        rows = load(path)
        result = evaluate(rows, [s.text for s in sanitizer.sanitize_many([r["text"] for r in rows])])
        report[path.stem] = {**result, "summary": summary(result)}
    return report


if __name__ == "__main__":
    import logging

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    print(orjson.dumps(ours(), option=orjson.OPT_INDENT_2).decode())
