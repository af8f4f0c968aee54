"""Keyword scoring, eval files, the promotion gate, champion transitions, and `cl eval` end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import orjson
import pytest

from continuous_learning import registry
from continuous_learning.core.errors import InputError, NothingToDo, RegistryError
from continuous_learning.evaluate import (
    GENERAL_FILE,
    EvalItem,
    load_eval_file,
    plan,
    score_answer,
)
from continuous_learning.evaluate.gate import GateRules, gate, mcnemar_gain, non_inferiority_p, sign_flip_gain


# --- scoring ---------------------------------------------------------------------------------------------
def item(*keywords: str, match: str = "all", forbidden: tuple[str, ...] = ()) -> EvalItem:
    return EvalItem(prompt="q", keywords=keywords, match=match, forbidden=forbidden)


@pytest.mark.parametrize(
    "answer, keywords, expected",
    [
        ("The capital of France is PARIS.", ("paris",), True),
        ("the capital is paris", ("Paris",), True),
        ("It is in New\n\t  York City", ("new york",), True),
        ("It is in New York", ("new   york",), True),
        ("It is in NewYork", ("new york",), False),
        ("Lyon", ("paris",), False),
        ("", ("paris",), False),
    ],
)
def test_keywords_ignore_case_and_whitespace(answer, keywords, expected):
    assert score_answer(answer, item(*keywords)) is expected


def test_match_all_and_any():
    assert score_answer("red and blue", item("red", "blue"))
    assert not score_answer("red only", item("red", "blue"))
    assert score_answer("red only", item("red", "blue", match="any"))
    assert not score_answer("green", item("red", "blue", match="any"))


def test_forbidden_keyword_fails_an_otherwise_passing_answer():
    assert not score_answer("Paris, or maybe Lyon", item("paris", forbidden=("lyon",)))
    assert score_answer("Paris", item("paris", forbidden=("lyon",)))
    assert not score_answer("It is LYON", item("lyon", "paris", match="any", forbidden=("LYON",)))


@pytest.mark.parametrize(
    "answer, keyword",
    [
        ("Cafe\u0301 au lait", "caf\u00e9"),  # decomposed vs composed accent
        ("ＰＡＲＩＳ is the capital", "paris"),  # full-width letters
        ("Die STRASSE ist lang", "straße"),  # casefold: ß = ss
        ("a \ufb01sh", "fish"),  # ligature
        ("non\u00a0breaking space", "non breaking"),  # NBSP is whitespace
    ],
)
def test_unicode_forms_match(answer, keyword):
    assert score_answer(answer, item(keyword))


def test_score_answer_accepts_a_plain_dict():
    assert score_answer("Paris", {"prompt": "q", "keywords": ["paris"], "forbidden": ["lyon"]})
    assert not score_answer("Paris", {"prompt": "q", "keywords": ["paris", "x"]})


# --- eval files ------------------------------------------------------------------------------------------
def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_eval_file_parses_optional_fields(tmp_path):
    path = write_lines(tmp_path / "e.jsonl", [
        {"prompt": "a?", "keywords": ["x"]},
        "",
        {"prompt": "b?", "keywords": ["y", "z"], "match": "any", "forbidden": ["w"], "id": "extra fields are fine"},
    ])
    items = load_eval_file(path)
    assert items == [EvalItem("a?", ("x",)), EvalItem("b?", ("y", "z"), "any", ("w",))]


@pytest.mark.parametrize(
    "lines, words",
    [
        ([], ["no eval questions"]),
        (["", "   "], ["no eval questions"]),
        (['{"prompt": "a?", "keywords": ["x"]}', "{not json"], ["line 2", "not valid JSON"]),
        ([{"prompt": "a?"}], ["line 1", "keywords"]),
        ([{"prompt": "a?", "keywords": []}], ["line 1", "at least one keyword"]),
        ([{"prompt": "a?", "keywords": ["ok", "  "]}], ["line 1", "non-empty strings"]),
        ([{"prompt": "a?", "keywords": "paris"}], ["line 1", "list"]),
        ([{"prompt": "", "keywords": ["x"]}], ["line 1", "prompt"]),
        ([{"prompt": "a?", "keywords": ["x"], "match": "most"}], ["line 1", "match"]),
        ([{"prompt": "a?", "keywords": ["x"], "forbidden": "y"}], ["line 1", "forbidden"]),
        (["[1, 2]"], ["line 1", "JSON object"]),
    ],
)
def test_bad_eval_files_name_the_line_and_the_fix(tmp_path, lines, words):
    path = write_lines(tmp_path / "e.jsonl", lines) if lines else tmp_path / "empty.jsonl"
    if not lines:
        path.write_bytes(b"")
    with pytest.raises(InputError) as caught:
        load_eval_file(path)
    for word in words:
        assert word in str(caught.value)
    assert '"keywords"' in str(caught.value)  # the hint shows the format


def test_missing_eval_file_says_how_to_create_one(tmp_path):
    with pytest.raises(InputError) as caught:
        load_eval_file(tmp_path / "eval" / "qa_eval.jsonl")
    assert '{"prompt": "What is the capital of France?", "keywords": ["Paris"]}' in str(caught.value)


def test_shipped_general_set_is_valid_large_and_apart_from_the_test_only_part():
    gate_part = load_eval_file(GENERAL_FILE)
    test_part = load_eval_file(Path(__file__).parent / "data" / "everyday_holdout.jsonl")
    assert len(gate_part) >= 50 and len(gate_part) + len(test_part) >= 60
    assert len({i.prompt for i in gate_part}) == len(gate_part)
    assert not {i.prompt for i in gate_part} & {i.prompt for i in test_part}
    numeric = [i for i in gate_part if any(any(c.isdigit() for c in k) for k in i.keywords)]
    assert len(numeric) >= 15  # forgetting shows first in numbers


@pytest.mark.parametrize(
    "answer, keyword, expected",
    [
        ("A decade has 10 years.", "10", True),
        ("It has 24 hours.", "4", False),
        ("About 1.4 metres", "4", False),
        ("Exactly 4.", "4", True),
        ("It closes at 12:30.", "2:30", False),
        ("It closes at 2:30 pm.", "2:30", True),
        ("It happens often", "ten", False),
        ("Prices in euros", "euro", True),
        ("首都は東京です", "東京", True),
    ],
)
def test_keywords_are_whole_numbers_and_words_that_start_where_a_word_starts(answer, keyword, expected):
    assert score_answer(answer, item(keyword)) is expected


# --- gate ------------------------------------------------------------------------------------------------
RULES = GateRules(gain_alpha=0.1, general_margin=0.1, general_alpha=0.05, min_questions=5, loss_margin=0.05)


def result(outcomes: list[bool], version: str | None = "1.1.0", general: list[bool] | None = None,
           status: str | None = "candidate", eval_loss: float | None = None) -> dict:
    items = [{"prompt": f"p{i}", "passed": ok, "answer": ""} for i, ok in enumerate(outcomes)]
    passed = sum(outcomes)
    out = {"version": version, "status": status, "items": items, "accuracy": passed / len(items), "passed": passed,
           "total": len(items), "general_accuracy": None, "general": None, "eval_loss": eval_loss}
    if general is not None:
        out["general"] = {"items": [{"prompt": f"g{i}", "passed": ok} for i, ok in enumerate(general)]}
        out["general_accuracy"] = sum(general) / len(general)
    return out


EVERYDAY = [True] * 51


@pytest.mark.parametrize(
    "wins, losses, p",
    [
        (0, 0, 1.0),
        (4, 0, 1 / 2**4),
        (5, 0, 1 / 2**5),
        (5, 1, 7 / 2**6),
        (0, 6, 1.0),
        (3, 3, 42 / 64),
    ],
)
def test_one_sided_exact_mcnemar_p_values(wins, losses, p):
    candidate = [True] * wins + [False] * losses + [True, False]
    champion = [False] * wins + [True] * losses + [True, False]
    assert mcnemar_gain(candidate, champion) == (wins, losses, pytest.approx(p))


def test_sign_flip_gain_is_mcnemar_on_questions_scored_0_or_1():
    import random

    rng = random.Random(3)
    for _ in range(40):
        n = rng.randint(1, 14)
        candidate, champion = [rng.random() < 0.6 for _ in range(n)], [rng.random() < 0.4 for _ in range(n)]
        wins, losses, p = mcnemar_gain(candidate, champion)
        assert sign_flip_gain([float(c) for c in candidate], [float(o) for o in champion]) == (
            wins, losses, pytest.approx(p))


def test_sign_flip_gain_on_shares_of_system_prompts_by_hand():
    """Differences +1, +1, +2/3, -1/3: of the 16 sign patterns, all-positive (sum 3) and the observed one (7/3)
    reach the observed sum, so p = 2/16; a question both answer alike (0) changes nothing."""
    gained, lost, p = sign_flip_gain([1, 1, 2 / 3, 0, 1], [0, 0, 0, 1 / 3, 1])
    assert (gained, lost, p) == (pytest.approx(8 / 3), pytest.approx(1 / 3), pytest.approx(2 / 16))


def scored_result(scores: list[float], version: str | None = "1.1.0", prompts: int = 3) -> dict:
    """A result whose target questions were asked under `prompts` system prompts (each score a share of them)."""
    out = result([s == 1 for s in scores], version, general=EVERYDAY)
    for item, share in zip(out["items"], scores):
        item["score"] = share
    out.update(score=sum(scores), system_prompts=[None, "a", "b"][:prompts])
    return out


def test_gate_weighs_partly_lost_questions_by_the_prompts_that_still_answer_them():
    """A second round: four new facts learned under every prompt, one old one still answered under 2 of 3. By the
    chat's prompt alone that is 4 gained, 1 lost (McNemar p = 0.19, refused); by the shares of prompts, the loss
    is a third of a question and the gain is significant."""
    old, new = [1.0] * 5 + [0.0] * 7, [1.0] * 4 + [2 / 3] + [1.0] * 4 + [0.0] * 3
    decision = gate(scored_result(new), scored_result(old, version="1.0.0"), RULES)
    assert decision.promote and decision.stats["gain_p_value"] == pytest.approx(2 / 32)
    assert "3 system prompts" in decision.summary and "sign-flip" in decision.summary
    as_one_prompt = gate(result([n == 1 for n in new], general=EVERYDAY),
                         result([o == 1 for o in old], version="1.0.0", general=EVERYDAY), RULES)
    assert not as_one_prompt.promote and as_one_prompt.stats["gain_p_value"] == pytest.approx(6 / 32)


def test_gate_compares_only_the_shown_answers_when_the_prompts_differ():
    new, old = scored_result([1.0] * 6, prompts=3), scored_result([0.0] * 6, version="1.0.0", prompts=2)
    decision = gate(new, old, RULES)
    assert decision.stats["system_prompts"] == 1 and "McNemar" in decision.summary


@pytest.mark.parametrize("lost, p", [(0, 0.0086), (1, 0.0278), (2, 0.0740), (3, 0.1635)])
def test_non_inferiority_score_test_on_51_questions(lost, p):
    """Tango's score test, margin 10 points: by hand from the restricted MLE (no discordant wins: p_won = 0)."""
    candidate = [False] * lost + [True] * (51 - lost)
    assert non_inferiority_p(candidate, EVERYDAY, 0.1) == pytest.approx(p, abs=1e-4)
    z = (lost / 51 - 0.1) / math.sqrt((0.1 - 0.01) / 51)
    assert non_inferiority_p(candidate, EVERYDAY, 0.1) == pytest.approx(0.5 * math.erfc(-z / math.sqrt(2)))


def test_gate_promotes_on_a_significant_gain_without_forgetting():
    decision = gate(result([True] * 5 + [False], general=EVERYDAY),
                    result([False] * 6, version=None, general=EVERYDAY), RULES)
    assert decision.promote
    assert decision.stats["wins"] == 5 and decision.stats["gain_p_value"] == pytest.approx(1 / 32)
    assert decision.summary.startswith("1.1.0 is promoted over base: it answers 5 of 6 target questions against 0")
    assert "51 everyday questions it keeps 51 against 51" in decision.summary


def test_gate_refuses_equal_accuracy_and_an_insignificant_gain():
    same = gate(result([True, False] * 3, general=EVERYDAY),
                result([True, False] * 3, version=None, general=EVERYDAY), RULES)
    assert not same.promote and "no significant gain" in same.summary
    small = gate(result([True] * 3 + [False] * 3, general=EVERYDAY),
                 result([False] * 6, version=None, general=EVERYDAY), RULES)
    assert not small.promote and small.stats["gain_p_value"] == pytest.approx(1 / 8)


def test_gate_refuses_a_gain_that_costs_everyday_answers():
    forgetful = [False, False] + [True] * 49
    decision = gate(result([True] * 6, general=forgetful), result([False] * 6, version=None, general=EVERYDAY), RULES)
    assert not decision.promote
    assert decision.stats["general_lost"] == 2 and "not shown non-inferior" in decision.summary
    one = gate(result([True] * 6, general=[False] + [True] * 50),
               result([False] * 6, version=None, general=EVERYDAY), RULES)
    assert one.promote


def test_gate_with_too_few_questions_judges_the_held_out_loss():
    lower = gate(result([True, True], eval_loss=1.0, general=EVERYDAY),
                 result([False, False], version=None, eval_loss=2.0, general=EVERYDAY), RULES)
    assert lower.promote and "held-out loss 2.000 -> 1.000" in lower.summary
    flat = gate(result([True, True], eval_loss=1.98, general=EVERYDAY),
                result([False, False], version=None, eval_loss=2.0, general=EVERYDAY), RULES)
    assert not flat.promote
    unknown = gate(result([True, True], general=EVERYDAY),
                   result([False, False], version=None, general=EVERYDAY), RULES)
    assert not unknown.promote and "no held-out loss" in unknown.summary


def test_gate_never_promotes_a_tainted_candidate():
    decision = gate(result([True] * 5, status="tainted"), result([False] * 5, version=None), RULES)
    assert not decision.promote and "tainted" in decision.reasons[0]


def test_gate_refuses_results_on_different_prompts():
    other = result([True, True], version=None)
    other["items"][1]["prompt"] = "something else"
    assert not gate(result([True, True]), other, RULES).promote


# --- pure registry transitions ---------------------------------------------------------------------------
def doc_with(*statuses: tuple[str, str]) -> dict:
    doc = registry.empty_registry()
    for version, status in statuses:
        doc["adapters"][version] = {"version": version, "status": status, "path": f"adapters/{version}", "evals": []}
    return doc


def test_promote_archives_the_old_champion_and_records_history():
    doc = registry.promote(doc_with(("1.0.0", "candidate"), ("1.1.0", "candidate")), "1.0.0", "first")
    doc = registry.promote(doc, "1.1.0", "better", forced=True)
    assert doc["champion"] == "1.1.0"
    assert doc["adapters"]["1.0.0"]["status"] == "archived"
    assert doc["adapters"]["1.1.0"]["status"] == "champion"
    assert [(h["action"], h["from"], h["to"], h["reason"], h["forced"]) for h in doc["history"]] == [
        ("promote", None, "1.0.0", "first", False),
        ("promote", "1.0.0", "1.1.0", "better", True),
    ]
    registry.validate(doc)


@pytest.mark.parametrize("status", ["failed", "tainted"])
def test_unusable_adapters_are_never_promoted(status):
    with pytest.raises(RegistryError, match=status):
        registry.promote(doc_with(("1.0.0", status)), "1.0.0", "x", forced=True)


def test_promote_unknown_or_current_champion():
    doc = doc_with(("1.0.0", "candidate"))
    with pytest.raises(RegistryError, match="no adapter version '9.9.9'"):
        registry.promote(doc, "9.9.9", "x")
    doc = registry.promote(doc, "1.0.0", "x")
    with pytest.raises(NothingToDo):
        registry.promote(doc, "1.0.0", "x")


def three_promotions() -> dict:
    doc = doc_with(("1.0.0", "candidate"), ("1.1.0", "candidate"), ("1.2.0", "candidate"))
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        doc = registry.promote(doc, version, "gate")
    return doc


def test_rollback_steps_follow_the_promotion_history():
    doc = three_promotions()
    assert registry.champion_lineage(doc) == ["1.1.0", "1.0.0", None]
    assert registry.rollback(json.loads(json.dumps(doc)), steps=1)["champion"] == "1.1.0"
    assert registry.rollback(json.loads(json.dumps(doc)), steps=2)["champion"] == "1.0.0"
    to_base = registry.rollback(json.loads(json.dumps(doc)), steps=3)
    assert to_base["champion"] is None and to_base["adapters"]["1.2.0"]["status"] == "archived"
    with pytest.raises(RegistryError, match="only 3 step"):
        registry.rollback(doc, steps=4)


def test_repeated_rollbacks_walk_back_to_the_base():
    doc = three_promotions()
    for expected in ("1.1.0", "1.0.0", None):
        doc = registry.rollback(doc)
        assert doc["champion"] == expected
    assert [h["action"] for h in doc["history"]] == ["promote"] * 3 + ["rollback"] * 3
    with pytest.raises(RegistryError, match="no champion to roll back"):
        registry.rollback(doc)


def test_rollback_to_a_version_or_base():
    doc = registry.rollback(three_promotions(), to="1.0.0", reason="bad answers")
    assert doc["champion"] == "1.0.0" and doc["adapters"]["1.0.0"]["status"] == "champion"
    assert doc["history"][-1] == {**doc["history"][-1], "action": "rollback", "from": "1.2.0", "to": "1.0.0",
                                  "reason": "bad answers"}
    assert registry.rollback(doc, to="base")["champion"] is None


def test_rollback_refuses_unusable_or_unknown_targets():
    doc = three_promotions()
    doc["adapters"]["1.1.0"]["status"] = "tainted"
    with pytest.raises(RegistryError, match="tainted"):
        registry.rollback(doc, steps=1)
    with pytest.raises(RegistryError, match="tainted"):
        registry.rollback(doc, to="1.1.0")
    with pytest.raises(RegistryError, match="no adapter version"):
        registry.rollback(doc, to="7.0.0")
    with pytest.raises(NothingToDo):
        registry.rollback(doc, to="1.2.0")


def test_record_eval_keeps_every_result():
    doc = registry.record_eval(doc_with(("1.0.0", "candidate")), "1.0.0", {"accuracy": 0.5})
    doc = registry.record_eval(doc, "1.0.0", {"accuracy": 0.75})
    doc = registry.record_eval(doc, None, {"accuracy": 0.25})
    assert [e["accuracy"] for e in doc["adapters"]["1.0.0"]["evals"]] == [0.5, 0.75]
    assert doc["base_evals"] == [{"accuracy": 0.25}]
    registry.validate(doc)


def test_plan_defaults():
    doc = doc_with(("1.0.0", "champion"), ("1.1.0", "candidate"))
    doc["champion"] = "1.0.0"
    assert plan(doc) == {"subject": "1.1.0", "against": "1.0.0", "compare": True, "gated": True}
    assert plan(doc, against="base") == {"subject": "1.1.0", "against": None, "compare": True, "gated": False}
    assert plan(doc, "1.0.0") == {"subject": "1.0.0", "against": None, "compare": True, "gated": False}
    assert plan(registry.empty_registry()) == {"subject": None, "against": None, "compare": False, "gated": False}
    with pytest.raises(InputError):
        plan(doc, "1.0.0", against="champion")


# --- real tiny adapters on disk --------------------------------------------------------------------------
def make_adapter(settings, version: str, seed: int, parent: str | None = None, snapshot: str | None = None) -> Path:
    """A real PEFT LoRA over the tiny model, saved and registered the way training registers one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from continuous_learning.chat.models import file_sha256, resolve_base

    base = resolve_base(settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    folder = settings.adapters_dir / version
    lora.save_pretrained(str(folder))
    files = ("adapter_model.safetensors", "adapter_config.json")
    entry = {
        "version": version, "status": "candidate", "path": f"adapters/{version}",
        "base_model": {"name": base.name, "sha256": base.sha256},
        "snapshot": {"id": snapshot, "sha256": "0" * 64} if snapshot else None, "parent": parent,
        "hyperparameters": {"lora_r": 4, "learning_rate": 5e-4}, "library_versions": {"peft": "test"},
        "sha256": {name: file_sha256(folder / name) for name in files}, "metrics": {"train_loss": 1.5},
        "note": f"adapter {version}",
    }
    registry.update(settings, lambda d: registry.register_adapter(d, entry), "register", version=version)
    return folder


@pytest.fixture
def two_adapters(settings) -> tuple[str, str]:
    make_adapter(settings, "1.0.0", seed=1)
    make_adapter(settings, "1.1.0", seed=2, parent="1.0.0")
    return "1.0.0", "1.1.0"


@pytest.fixture
def fast_eval(monkeypatch):
    monkeypatch.setenv("CL_EVAL_MAX_NEW_TOKENS", "6")
    monkeypatch.setenv("CL_EVAL_BATCH_SIZE", "3")


def events(settings) -> list[dict]:
    return [orjson.loads(line) for line in settings.learning_events.read_bytes().splitlines()]


def test_rollback_checks_sha256_before_moving_the_pointer(settings, two_adapters):
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    registry.promote_version(settings, "1.1.0", "second", forced=True)
    weights = settings.adapters_dir / "1.0.0" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(RegistryError, match="does not match its recorded sha256"):
        registry.rollback_champion(settings)
    assert registry.load(settings)["champion"] == "1.1.0"
    weights.write_bytes(original)
    moved = registry.rollback_champion(settings, reason="regression")
    assert (moved["from"], moved["to"]) == ("1.1.0", "1.0.0")
    assert isinstance(moved["seconds"], float) and moved["seconds"] >= 0  # its speed: bench/bench_rollback.py
    doc = registry.load(settings)
    assert doc["champion"] == "1.0.0" and doc["adapters"]["1.1.0"]["status"] == "archived"
    assert doc["history"][-1]["action"] == "rollback" and doc["history"][-1]["reason"] == "regression"
    assert events(settings)[-1] | {"from": "1.1.0", "to": "1.0.0", "event": "rollback"} == events(settings)[-1]


def test_rollback_refuses_a_missing_folder_and_allows_the_base(settings, two_adapters):
    import shutil

    registry.promote_version(settings, "1.0.0", "first", forced=True)
    registry.promote_version(settings, "1.1.0", "second", forced=True)
    shutil.rmtree(settings.adapters_dir / "1.0.0")
    with pytest.raises(RegistryError, match="folder .* is missing"):
        registry.rollback_champion(settings)
    assert registry.rollback_champion(settings, to="base")["to"] is None
    assert registry.load(settings)["champion"] is None


def test_evaluate_versions_loads_the_base_once(settings, two_adapters, fast_eval, monkeypatch):
    from continuous_learning import evaluate
    from continuous_learning.chat import models
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    loads = []
    real_load = models.ChatModel.load.__func__
    monkeypatch.setattr(models.ChatModel, "load", classmethod(lambda cls, s: loads.append(1) or real_load(cls, s)))
    eval_file = write_lines(settings.eval_dir / "qa_eval.jsonl",
                            [{"prompt": f"Question {i}?", "keywords": ["zzqx"]} for i in range(4)])
    results = evaluate.evaluate_versions(settings, ["1.1.0", "1.0.0", "base"], include_general=False)
    assert len(loads) == 1
    assert [r["label"] for r in results] == ["1.1.0", "1.0.0", "base"]
    first = results[0]
    assert first["total"] == 4 and first["accuracy"] == 0.0 and first["status"] == "candidate"
    assert first["eval_file"]["path"] == "eval/qa_eval.jsonl"
    assert first["eval_file"]["sha256"] == __import__("hashlib").sha256(eval_file.read_bytes()).hexdigest()
    assert first["tokens_per_s"] > 0 and first["latency_ms_per_prompt"] > 0 and first["completion_tokens"] > 0
    assert first["general"] is None and first["eval_loss"] is None
    answers = [[i["answer"] for i in r["items"]] for r in results]
    assert answers[0] != answers[1] != answers[2]  # each version really answered with its own weights
    # each question was asked under the chat's prompt (the answer shown), none, and one training never uses
    assert first["system_prompts"] == [settings.chat.system_prompt, None, evaluate.OTHER_SYSTEM_PROMPTS[1]]
    assert all(len(i["passed_under"]) == 3 and i["passed_under"][0] == i["passed"] for i in first["items"])
    assert first["score"] == sum(i["score"] for i in first["items"])


def test_held_out_loss_on_a_snapshot(settings, fast_eval):
    from continuous_learning import evaluate
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    make_adapter(settings, "1.0.0", seed=1, snapshot="snap-1")
    held_out = settings.curated_dir / "curated_1_eval.jsonl"
    write_lines(held_out, [{"messages": [{"role": "user", "content": "Where is lot A-17?"},
                                         {"role": "assistant", "content": "In hall 3."}]}])
    snapshot = {"id": "snap-1", "eval_file": "data/curated/curated_1_eval.jsonl"}
    registry.update(settings, lambda d: registry.add_snapshot(d, snapshot), "snapshot")
    write_lines(settings.eval_dir / "qa_eval.jsonl", [{"prompt": "Where is lot A-17?", "keywords": ["hall 3"]}])
    report = evaluate.evaluate_and_gate(settings, "1.0.0", promote=False, include_general=False)
    subject, base = report["subject"], report["against"]
    assert subject["snapshot"] == "snap-1" and base["snapshot"] == "snap-1"
    assert math.isfinite(subject["eval_loss"])
    assert subject["perplexity"] == pytest.approx(math.exp(subject["eval_loss"]))
    assert subject["eval_loss"] != pytest.approx(base["eval_loss"])


def test_an_adapter_of_another_base_is_refused(settings, fast_eval):
    from continuous_learning import evaluate

    make_adapter(settings, "1.0.0", seed=1)

    def other_base(doc: dict) -> dict:
        doc["adapters"]["1.0.0"]["base_model"] = {"name": "other", "sha256": "f" * 64}
        return doc

    registry.update(settings, other_base, "edit")
    write_lines(settings.eval_dir / "qa_eval.jsonl", [{"prompt": "Hi?", "keywords": ["x"]}])
    with pytest.raises(RegistryError, match="trained on another base model"):
        evaluate.evaluate_versions(settings, ["1.0.0"], include_general=False)


def test_assistant_only_labels_cover_the_final_answer(tiny_model_dir):
    from transformers import AutoTokenizer

    from continuous_learning.evaluate import assistant_only_labels

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "Where is lot A-17?"},
        {"role": "assistant", "content": "In hall 3."},
    ]
    ids, labels = assistant_only_labels(tokenizer, messages)
    assert len(ids) == len(labels)
    scored = [t for t, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(scored) == "In hall 3.<|im_end|>"
    assert all(label in (-100, t) for t, label in zip(ids, labels))
    assert assistant_only_labels(tokenizer, messages[:-1]) is None


# --- CLI end to end --------------------------------------------------------------------------------------
def cl(*args: str):
    from typer.testing import CliRunner

    from continuous_learning.cli import app

    return CliRunner().invoke(app, list(args))


def discriminating_eval(answers: dict[str, str], winner: str, loser: str) -> list[dict]:
    """Eval lines that the winner's answers pass and the loser's fail (built from what each really said)."""
    lines = []
    for prompt, (good, bad) in answers.items():
        words = [w for w in good.split() if w.casefold() not in bad.casefold()]
        if words:
            lines.append({"prompt": prompt, "keywords": [words[0]]})
        else:
            extra = [w for w in bad.split() if w.casefold() not in good.casefold()]
            lines.append({"prompt": prompt, "keywords": [good.split()[0] if good.split() else "zzqx"],
                          "forbidden": extra[:1] or ["zzqx"]})
    return lines


def test_cl_eval_gates_and_promotes_end_to_end(settings, two_adapters, fast_eval):
    eval_path = settings.eval_dir / "qa_eval.jsonl"
    prompts = ["What is in hall 3?", "Who checks lot B-2?", "When is the shift change?", "Where is pump P-4?",
               "Which line makes part QX-17?", "What torque does the Vanta bolt need?"]
    write_lines(eval_path, [{"prompt": p, "keywords": ["zzqx"]} for p in prompts])
    registry.promote_version(settings, "1.0.0", "first", forced=True)

    probe = cl("eval", "--json", "--no-promote", "--no-general")
    assert probe.exit_code == 0, probe.output
    report = json.loads(probe.stdout)
    assert (report["subject"]["label"], report["against"]["label"]) == ("1.1.0", "1.0.0")
    said = {v: {i["prompt"]: i["answer"] for i in report[k]["items"]}
            for k, v in (("subject", "1.1.0"), ("against", "1.0.0"))}
    answers = {p: (said["1.1.0"][p], said["1.0.0"][p]) for p in prompts}
    write_lines(eval_path, discriminating_eval(answers, "1.1.0", "1.0.0"))

    run = cl("eval")
    assert run.exit_code == 0, run.output
    assert "gate: promote" in run.output and "1.1.0 is now the champion" in run.output
    assert "6/6 (100%)" in run.output and "0/6 (0%)" in run.output and "general accuracy" in run.output
    assert "1.1.0 is promoted over 1.0.0: it answers 6 of 6 target questions against 0" in " ".join(run.output.split())
    doc = registry.load(settings)
    assert doc["champion"] == "1.1.0" and doc["adapters"]["1.0.0"]["status"] == "archived"
    assert doc["history"][-1]["action"] == "promote" and doc["history"][-1]["reason"].startswith("gate:")
    latest = doc["adapters"]["1.1.0"]["evals"][-1]
    assert latest["accuracy"] == 1.0 and [i["passed"] for i in latest["items"]] == [True] * 6
    assert latest["general"]["total"] == len(load_eval_file(GENERAL_FILE)) and latest["general_accuracy"] is not None
    assert doc["adapters"]["1.0.0"]["evals"][-1]["accuracy"] == 0.0
    assert {"eval", "promote"} <= {e["event"] for e in events(settings)}

    listing = cl("adapters")
    assert listing.exit_code == 0 and "1.1.0" in listing.output and "100%" in listing.output and "*" in listing.output
    shown = cl("adapters", "show", "1.1.0")
    assert shown.exit_code == 0, shown.output
    assert "1.1.0 <- 1.0.0 <- base" in shown.output and "lora_r=4" in shown.output
    as_json = json.loads(cl("adapters", "--json").stdout)
    assert as_json["champion"] == "1.1.0" and [a["version"] for a in as_json["adapters"]] == ["1.0.0", "1.1.0"]

    back = cl("rollback")
    assert back.exit_code == 0, back.output
    assert "champion: 1.1.0 -> 1.0.0" in back.output and " ms)" in back.output
    assert cl("rollback", "--steps", "5").exit_code == 4


def test_cl_eval_keeps_a_worse_candidate(settings, two_adapters, fast_eval):
    eval_path = settings.eval_dir / "qa_eval.jsonl"
    prompts = ["Where is the spare valve?", "What torque for part P-9?"]
    write_lines(eval_path, [{"prompt": p, "keywords": ["zzqx"]} for p in prompts])
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    report = json.loads(cl("eval", "--json", "--no-promote", "--no-general").stdout)
    said = {k: {i["prompt"]: i["answer"] for i in report[k]["items"]} for k in ("subject", "against")}
    answers = {p: (said["against"][p], said["subject"][p]) for p in prompts}
    write_lines(eval_path, discriminating_eval(answers, "1.0.0", "1.1.0"))
    run = cl("eval")
    assert run.exit_code == 0, run.output
    said = " ".join(run.output.split())
    assert "keep as candidate" in run.output and "1.1.0 is not promoted over 1.0.0" in said
    # the target questions already refuse it: the everyday set, which could not change that, is not asked
    assert "its everyday questions were not asked, since the rules above already refuse it" in said
    doc = registry.load(settings)
    assert doc["champion"] == "1.0.0" and doc["adapters"]["1.1.0"]["status"] == "candidate"
    for version in ("1.1.0", "1.0.0"):
        latest = doc["adapters"][version]["evals"][-1]
        assert latest["general"] is None and latest["general_skipped"] and latest["total"] == 2
    measured = json.loads(cl("eval", "--json", "--no-promote").stdout)  # measure, do not decide: everything asked
    assert measured["subject"]["general"]["total"] == len(load_eval_file(GENERAL_FILE))


def test_cl_promote_and_errors(settings, two_adapters):
    ok = cl("promote", "1.1.0", "--reason", "hotfix")
    assert ok.exit_code == 0 and "champion: base -> 1.1.0" in ok.output
    assert registry.load(settings)["history"][-1]["forced"] is True
    with pytest.raises(RegistryError, match="champion changed"):  # a gate compared against the base: stale now
        registry.promote_version(settings, "1.0.0", "gate", expected_champion=None)
    missing = cl("eval", "--no-general")
    assert missing.exit_code == 2 and "no eval file" in missing.output and '"keywords"' in missing.output
    assert cl("promote", "4.0.0").exit_code == 4


def test_rollback_path_does_not_import_torch(workspace):
    import subprocess
    import sys

    code = ("import sys; from continuous_learning.cli import main\n"
            "try:\n    main(['rollback'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workspace)
    assert out.returncode == 0, out.stderr
    assert "no champion to roll back" in out.stderr  # its speed: bench/bench_rollback.py


# --- the real bundled model ------------------------------------------------------------------------------
@pytest.mark.real_model
def test_the_shipped_everyday_answers_are_the_bundled_models_own(real_workspace, tmp_path):
    """The package ships the base's scored answers to the everyday set on the defaults, so a new user's first gate
    does not generate them; they must be exactly what the model answers now, and mostly right. Checked on every
    fourth question (a stale file differs on most); on a mismatch all are generated, for the file to copy."""
    from continuous_learning.chat.models import ChatModel
    from continuous_learning.core.settings import load_settings
    from continuous_learning.evaluate import question_conversations
    from continuous_learning.evaluate.generation import answer_in_batches
    from continuous_learning.evaluate.questions import file_info
    from continuous_learning.evaluate.scoring import score_items
    from continuous_learning.evaluate.versions import machine_cache, result_context, shipped_answers

    settings = load_settings()
    chat = ChatModel.load(settings)
    items = load_eval_file(GENERAL_FILE)
    cache = machine_cache(settings, result_context(settings, chat.base.sha256),
                          file_info(settings, GENERAL_FILE)["sha256"], "cpu")
    shipped = shipped_answers(cache)
    assert shipped.is_file(), f"no shipped everyday answers for the defaults at {shipped}"
    sample = items[::4]
    answers, _ = answer_in_batches(chat, question_conversations(settings, sample), settings)
    fresh = score_items(sample, answers)
    assert fresh["accuracy"] >= 0.9, [(i["prompt"], i["answer"]) for i in fresh["items"] if not i["passed"]]
    stored = orjson.loads(shipped.read_bytes())
    if stored["items"][::4] != fresh["items"] or stored["total"] != len(items):
        everything = score_items(items, answer_in_batches(chat, question_conversations(settings, items), settings)[0])
        (tmp_path / cache.name).write_bytes(orjson.dumps(everything))
        pytest.fail(f"the shipped answers are stale: copy {tmp_path / cache.name} to {shipped}")
    assert stored["passed"] == sum(i["passed"] for i in stored["items"])  # the file's own figures hold together
    one_by_one = chat.generate_batch(question_conversations(settings, sample[:4]),
                                     max_new_tokens=settings.eval.max_new_tokens, batch_size=1)
    assert one_by_one == answers[:4]


def test_eval_batches_hold_at_most_2_gb_of_key_value_cache():
    """`eval.batch_size` (128) rows for the bundled model; a 7B model's rows hold 0.5 MB of cache per token in bf16,
    so its batch is cut to what fits in 2 GB."""
    import dataclasses

    import torch
    from transformers import LlamaConfig

    from continuous_learning.core.settings import load_settings
    from continuous_learning.evaluate.generation import KV_CACHE_BUDGET, rows_per_batch

    @dataclasses.dataclass
    class Weights:  # what rows_per_batch reads of a model: its config and its weights' element size
        config: LlamaConfig
        dtype: torch.dtype

        def parameters(self):
            yield torch.empty(1, dtype=self.dtype)

    settings = load_settings(env={})
    small = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert rows_per_batch(Weights(small, torch.float32), 100, settings) == settings.eval.batch_size == 128
    big = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096)
    rows = rows_per_batch(Weights(big, torch.bfloat16), 100, settings)
    per_row = 2 * 32 * 4096 * 2 * (100 + settings.eval.max_new_tokens)
    assert rows == KV_CACHE_BUDGET // per_row == 24
    assert rows_per_batch(Weights(big, torch.bfloat16), 10**7, settings) == 1  # never less than one row
