"""`cl curate`: selection, dedupe, domain cap, leak-free split, incremental cursor, replay, CLI and pipeline."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.storage import store
from continuous_learning.curate import (
    Example,
    Rules,
    blocklist_pattern,
    jaccard,
    normalise,
    run_curate,
    sample_replay,
    select,
    shingles,
)
from continuous_learning.core.errors import ConfigError, LockHeldError
from continuous_learning.core.records import Feedback, FeedbackEvent, Interaction
from curate_oracle import cap_domains, dedupe_exact, dedupe_near, leaked_prompts, pooled_split, split_eval

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def turn(prompt: str, answer: str, minute: float, *, user: str = "alice", system: str | None = None,
         history: tuple = (), feedback: dict | None = None, **fields) -> Interaction:
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Interaction(messages=messages, session_id="s1", user_hash=user, feedback=Feedback(**(feedback or {})),
                       created_at=at(minute), recorded_at=at(minute), **fields)


def event(target: Interaction, minute: float, user: str = "alice", **feedback) -> dict:
    return FeedbackEvent(target.id, Feedback(**feedback), user_hash=user, created_at=at(minute)).to_dict()


def append(settings, *records) -> None:
    store.append_jsonl(settings.raw_log, [r.to_dict() if isinstance(r, Interaction) else r for r in records])


SQL = [
    ("How do I count the rows of a table in SQL?", "SELECT COUNT(*) FROM table_name; returns the number of rows."),
    ("Which SQL clause filters groups after aggregation?", "HAVING filters groups produced by GROUP BY, unlike WHERE."),
    ("How can I remove duplicate rows from a query result?", "Add DISTINCT after SELECT to drop repeated result rows."),
    ("What is the difference between an inner and a left join?", "A left join keeps unmatched rows from the left table."),
    ("How do I sort query results by date, newest first?", "Use ORDER BY created_at DESC at the end of the query."),
    ("What does a primary key guarantee in a relational table?", "Each value is unique and never NULL for that column."),
    ("How do I add an index to speed up lookups by email?", "CREATE INDEX idx_users_email ON users(email); helps."),
    ("How do I rename a column in PostgreSQL?", "ALTER TABLE t RENAME COLUMN old_name TO new_name; does it."),
]


def write_corpus(settings) -> dict[str, Interaction]:
    """A log with one turn per rule; names say what must happen to each."""
    t = {
        "helpful_y": turn("How do I list the files in a directory with Python?",
                          "Call os.listdir(path), or iterate pathlib.Path(path).iterdir() for Path objects.", 0,
                          feedback={"helpful": True}),
        "helpful_5": turn("What does the HTTP status code 404 mean?",
                          "It means the server could not find the requested resource at that URL.", 1,
                          user="bob", feedback={"score": 5}),
        "exact_dup": turn("how do I   list the files in a directory with python?",
                          "Call os.listdir(path), or iterate pathlib.Path(path).iterdir() for Path objects.", 2,
                          user="dave", feedback={"helpful": True}),
        "near_word": turn("What does the HTTP status code 404 mean exactly?",
                          "It means the server could not find the requested resource at that URL.", 3,
                          user="carol", feedback={"score": 4}),
        "punct_a": turn("Which command shows the git history of a single file?",
                        "Run git log --follow -- path/to/file to see every commit that touched it.", 4,
                        target_tool="git", feedback={"helpful": True}),
        "punct_b": turn("Which command shows the git history of a single file",
                        "Run git log --follow -- path/to/file to see every commit that touched it!", 5,
                        user="erin", target_tool="git", feedback={"score": 5}),
        "unhelpful_n": turn("Tell me a good name for a cat.", "Dogs are loyal animals.", 6, feedback={"helpful": False}),
        "unhelpful_1": turn("Convert 10 km to miles.", "10 km is 100 miles.", 7, feedback={"score": 1}),
        "neutral_3": turn("Summarise the plot of Hamlet.", "A prince is sad.", 8, feedback={"score": 3}),
        "skipped": turn("What is the boiling point of water at sea level?", "100 degrees Celsius at sea level.", 9),
        "late_in_log": turn("How many bytes are in a kibibyte?", "A kibibyte is exactly 1024 bytes.", 10),
        "corrected": turn("What is the capital of Australia?", "Sydney is the capital of Australia.", 11,
                          feedback={"helpful": False, "correction": "Canberra is the capital of Australia."}),
        "truncated": turn("Explain recursion briefly.", "Recursion is when a function", 12,
                          truncated=True, feedback={"helpful": True}),
        "truncated_corrected": turn("Name the largest planet of the solar system.", "The largest planet is", 13,
                                    truncated=True, feedback={"correction": "Jupiter is the largest planet."}),
        "pii": turn("Write to my colleague about the meeting.", "Sure, here is a draft for [PERSON].", 14,
                    pii_flagged=True, feedback={"helpful": True}),
        "private": turn("Help me word a message to my doctor.", "Here is a polite message you can send.", 15,
                        feedback={"helpful": True, "private": True}),
        "private_late": turn("Draft a note about my salary review.", "Here is a short, factual note.", 16,
                             feedback={"score": 5}),
        "empty": turn("Say something nice about mornings.", "", 17, feedback={"helpful": True}),
        "too_short": turn("?", "Could you say what you would like to know?", 18, feedback={"helpful": True}),
        "too_long": turn("Write a very long story.", "x" * 9000, 19, feedback={"helpful": True}),
        "blocked": turn("Can you frobnicate the widget for me please?", "Frobnicating the widget now.", 20,
                        feedback={"helpful": True}),
        "multi": turn("And in Rust?", "In Rust, use std::fs::read_dir(path) and iterate the entries.", 21,
                      system="You are a terse programming assistant.",
                      history=({"role": "user", "content": "How do I list a directory in Go?"},
                               {"role": "assistant", "content": "Use os.ReadDir(path) in Go."}),
                      feedback={"score": 5}),
    }
    for i, (prompt, answer) in enumerate(SQL):
        t[f"sql_{i}"] = turn(prompt, answer, 30 + i, target_tool="sql", feedback={"score": 4 if i == 3 else 5})
    malformed = turn("Unanswered question?", "placeholder", 40).to_dict()
    malformed["messages"] = malformed["messages"][:1]
    records = list(t.values())[:8] + [b"{not json"] + list(t.values())[8:] + [
        event(t["late_in_log"], 50, score=5), event(t["private_late"], 51, private=True), malformed,
    ]
    settings.raw_log.parent.mkdir(parents=True, exist_ok=True)
    for record in records:  # one append per record, like real turns; the bad line goes in raw
        if isinstance(record, bytes):
            with open(settings.raw_log, "ab") as handle:
                handle.write(record + b"\n")
        else:
            append(settings, record)
    with open(settings.raw_log, "ab") as handle:  # a writer killed mid-line
        handle.write(b'{"schema_version": 1, "type": "interaction", "messa')
    return t


@pytest.fixture
def cfg(settings):
    """The workspace settings with a blocklist."""
    return dataclasses.replace(settings, curate=dataclasses.replace(settings.curate, blocklist=["frobnicate"]))


def read_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def snapshot_files(settings, manifest) -> tuple[list[dict], list[dict]]:
    return read_lines(settings.home / manifest["files"]["train"]), read_lines(settings.home / manifest["files"]["eval"])


def sources(examples: list[dict]) -> set[str]:
    return {s for e in examples for s in e["source_ids"]}


# --- the whole corpus ---------------------------------------------------------------------------------
EXPECTED_KEPT = ["helpful_y", "helpful_5", "punct_b", "late_in_log", "corrected", "truncated_corrected", "multi",
                 "unhelpful_n", "unhelpful_1"] + [
    f"sql_{i}" for i in range(8) if i != 3
]


def test_corpus_lands_exactly_where_expected(cfg):
    t = write_corpus(cfg)
    manifest = run_curate(cfg, note="first")
    assert manifest["status"] == "created" and manifest["note"] == "first"
    train, held = snapshot_files(cfg, manifest)
    everything = train + held
    c = manifest["counts"]
    assert (len(train), len(held)) == (14, 2) == (c["train"], c["eval"])
    # exactly the expected turns, each in one example; collapsed duplicates ride along as extra sources
    assert sources(everything) == {t[n].id for n in EXPECTED_KEPT} | {t["exact_dup"].id, t["near_word"].id, t["punct_a"].id}
    by_source = {s: e for e in everything for s in e["source_ids"]}
    assert by_source[t["helpful_5"].id] is by_source[t["near_word"].id]
    assert by_source[t["helpful_5"].id]["messages"][0]["content"] == "What does the HTTP status code 404 mean?"  # best rated
    assert by_source[t["helpful_5"].id]["user_hashes"] == ["bob", "carol"]
    assert by_source[t["punct_b"].id]["source_ids"] == [t["punct_b"].id, t["punct_a"].id]
    assert by_source[t["helpful_y"].id] is by_source[t["exact_dup"].id]
    assert t["sql_3"].id not in sources(everything)  # the capped one is the worst-rated sql turn
    corrected = by_source[t["corrected"].id]
    assert (corrected["kind"], corrected["weight"]) == ("corrected", 2.0)
    assert corrected["messages"][-1] == {"role": "assistant", "content": "Canberra is the capital of Australia."}
    assert by_source[t["truncated_corrected"].id]["messages"][-1]["content"] == "Jupiter is the largest planet."
    multi = by_source[t["multi"].id]
    assert [m["role"] for m in multi["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert by_source[t["sql_0"].id]["target_tool"] == "sql" and by_source[t["helpful_y"].id]["target_tool"] is None
    assert by_source[t["late_in_log"].id]["kind"] == "helpful"
    fields = {"messages", "id", "source_ids", "weight", "kind", "target_tool", "user_hashes", "created_at",
              "prompt", "completion", "label"}
    assert all(set(e) - {"chosen", "rejected"} == fields for e in everything)
    # "no" answers are undesirable examples; a correction with a usable model answer is a pair
    assert by_source[t["unhelpful_n"].id]["label"] is False and by_source[t["unhelpful_n"].id]["kind"] == "unhelpful"
    assert by_source[t["unhelpful_1"].id]["completion"] == [{"role": "assistant", "content": "10 km is 100 miles."}]
    assert corrected["label"] is True and corrected["chosen"] == corrected["completion"]
    assert corrected["rejected"] == [{"role": "assistant", "content": "Sydney is the capital of Australia."}]
    assert corrected["prompt"] == corrected["messages"][:-1]
    assert "rejected" not in by_source[t["truncated_corrected"].id]  # a cut-off answer is no fair "rejected"
    assert sum(1 for e in everything if "rejected" in e) == 1

    assert c["selected"] == {"corrected": 2, "helpful": 16, "unrated": 0, "unhelpful": 2}
    assert {k: v for k, v in c["dropped"].items() if v} == {
        "neutral": 1, "unrated": 1, "private": 2, "pii_flagged": 1, "truncated": 1, "empty": 1,
        "too_short": 1, "too_long": 1, "blocklisted": 1, "malformed": 1,
    }
    assert c["deduped"] == {"exact": 1, "near": 2}
    assert c["capped"] == {"total": 1, "by_domain": {"sql": 1}}
    assert manifest["cursor"]["deferred_ids"] == [t["sql_3"].id]  # offered again with the next new material
    assert (c["bad_lines"], c["torn_tail"], c["replayed"], c["new_examples"]) == (2, True, 0, 16)
    assert (c["interactions"], c["feedback_events"], c["orphan_feedback"]) == (31, 2, 0)

    assert not leaked_prompts([Example.from_record(e) for e in train], [Example.from_record(e) for e in held], 0.8)
    assert not {normalise(e["messages"][-2]["content"]) for e in train} & {normalise(e["messages"][-2]["content"]) for e in held}

    snap = registry.load(cfg)["snapshots"][-1]
    assert snap["id"] == manifest["id"] and snap["sha256"] == manifest["sha256"]["train"]
    assert snap["user_hashes"] == ["alice", "bob", "carol", "dave", "erin"]
    for key in ("file", "eval_file", "manifest"):
        path = cfg.home / snap[key]
        assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert json.loads((cfg.home / snap["manifest"]).read_text())["counts"] == c
    events = read_lines(cfg.learning_events)
    assert events[-1]["event"] == "snapshot_created" and events[-1]["snapshot"] == manifest["id"]


def test_snapshot_loads_with_datasets_and_renders_with_chat_template(cfg, smollm_tokenizer_dir, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    write_corpus(cfg)
    manifest = run_curate(cfg)
    train_file = str(cfg.home / manifest["files"]["train"])
    data = load_dataset("json", data_files=train_file, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(data) == manifest["counts"]["train"]
    assert set(data.column_names) >= {"messages", "id", "weight", "kind", "source_ids", "user_hashes"}
    tokenizer = AutoTokenizer.from_pretrained(str(smollm_tokenizer_dir))
    for row in data:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert text.count("<|im_start|>assistant") >= 1
        assert text.rstrip().endswith(row["messages"][-1]["content"] + "<|im_end|>")
    multi = next(r for r in data if r["messages"][0]["role"] == "system")
    assert "You are a terse programming assistant." in tokenizer.apply_chat_template(multi["messages"], tokenize=False)


# --- incremental --------------------------------------------------------------------------------------
def test_incremental_runs_take_only_new_material_plus_replay(cfg):
    t = write_corpus(cfg)
    first = run_curate(cfg)
    first_train, first_eval = snapshot_files(cfg, first)
    files = sorted(cfg.curated_dir.iterdir())
    registry_before = cfg.registry_file.read_bytes()

    again = run_curate(cfg)
    assert again["status"] == "nothing_new" and again["id"] is None
    assert "nothing new to curate" in again["message"]
    assert sorted(cfg.curated_dir.iterdir()) == files and cfg.registry_file.read_bytes() == registry_before

    fresh = [turn(f"New question number {w} about {w} things?", f"A careful answer about {w} topics, with detail.",
                  100 + i, feedback={"score": 5}) for i, w in enumerate(("astronomy", "botany", "chemistry"))]
    append(cfg, *fresh, event(t["skipped"], 104, score=5),  # a late rating of an old, unrated turn
           event(t["helpful_y"], 105, correction="Use pathlib.Path(path).iterdir()."))  # already in a snapshot
    third = run_curate(cfg, note="second batch")
    train, held = snapshot_files(cfg, third)
    c = third["counts"]
    assert (c["new_interactions"], c["late_feedback"], c["late_feedback_already_in_snapshot"], c["deferred"]) == (3, 1, 1, 1)
    assert (c["new_examples"], c["replayed"], c["train"], c["eval"]) == (5, 2, 6, 1)
    new = [e for e in train + held if e["kind"] != "replay"]
    assert sources(new) == {i.id for i in fresh} | {t["skipped"].id, t["sql_3"].id}  # + the turn capped last time
    replayed = [e for e in train if e["kind"] == "replay"]
    assert len(replayed) == 2 and {e["id"] for e in replayed} <= {e["id"] for e in first_train}
    assert not {normalise(e["messages"][-2]["content"]) for e in replayed} & {normalise(e["messages"][-2]["content"]) for e in new}
    assert third["cursor"]["deferred_ids"] == []
    assert third["replay_pool"] == [first["id"]]
    assert third["previous_cursor"] == first["cursor"]
    assert [s["id"] for s in registry.load(cfg)["snapshots"]] == [first["id"], third["id"]]

    full = run_curate(cfg, full=True)
    full_train, full_eval = snapshot_files(cfg, full)
    assert full["mode"] == "full" and full["counts"]["replayed"] == 0
    assert sources(full_train + full_eval) >= sources(first_train + first_eval) | sources(new)
    helpful_y = next(e for e in full_train + full_eval if t["helpful_y"].id in e["source_ids"])
    assert helpful_y["kind"] == "corrected"  # the full rebuild sees the late correction


def test_cursor_does_not_lose_turns_stamped_in_the_same_millisecond(cfg):
    first = turn("What is the speed of light in vacuum?", "About 299,792 kilometres per second.", 0, feedback={"score": 5})
    append(cfg, first)
    assert run_curate(cfg)["status"] == "created"
    twin = turn("How far is the Moon from the Earth?", "About 384,400 kilometres on average.", 0, feedback={"score": 5})
    append(cfg, twin)  # same recorded_at as the cursor, appended after the run
    second = run_curate(cfg)
    assert second["status"] == "created" and second["counts"]["new_interactions"] == 1
    assert sources(snapshot_files(cfg, second)[0]) >= {twin.id}


def test_dropped_turns_alone_are_nothing_new_and_same_second_runs_get_distinct_ids(cfg):
    append(cfg, turn("Bad answer question here?", "Wrong.", 0, feedback={"score": 3}))
    nothing = run_curate(cfg)
    assert nothing["status"] == "nothing_new" and "1 neutral" in nothing["message"]
    assert not cfg.curated_dir.exists() or not any(cfg.curated_dir.iterdir())
    now = datetime(2026, 2, 1, 12, 0, 0, tzinfo=timezone.utc)
    append(cfg, turn("Which planet is known as the red planet?", "Mars is called the red planet.", 1, feedback={"score": 5}))
    a = run_curate(cfg, now=now)
    append(cfg, turn("Which gas do plants absorb from the air?", "Plants absorb carbon dioxide.", 2, feedback={"score": 5}))
    b = run_curate(cfg, now=now)
    assert (a["id"], b["id"]) == ("curated_20260201_120000", "curated_20260201_120000_2")


def test_retention_and_include_unrated(cfg):
    old = turn("An old question about the weather?", "It was sunny that day.", 0, feedback={"score": 5})
    recent = turn("A recent question about the tides?", "Tides follow the Moon's pull.", 60 * 24 * 35)
    append(cfg, old, recent)
    aged = dataclasses.replace(cfg, curate=dataclasses.replace(cfg.curate, retention_days=30))
    manifest = run_curate(aged, include_unrated=True, now=T0 + timedelta(days=40))
    c = manifest["counts"]
    assert c["selected"]["unrated"] == 1
    # retention rewrote the raw log before selection: the expired turn is gone for good, not merely skipped
    assert [r["id"] for _, r in store.iter_jsonl(cfg.raw_log)] == [recent.id]
    (example,) = snapshot_files(cfg, manifest)[0]
    assert (example["kind"], example["weight"], example["source_ids"]) == ("unrated", 0.5, [recent.id])
    assert manifest["settings"]["include_unrated"] is True and manifest["settings"]["retention_days"] == 30


def test_lock_and_bad_settings(cfg):
    append(cfg, turn("Which ocean is the largest?", "The Pacific Ocean is the largest.", 0, feedback={"score": 5}))
    with store.workspace_lock(cfg.lock_dir, "curate"):
        with pytest.raises(LockHeldError):
            run_curate(cfg)
    broken = dataclasses.replace(cfg, curate=dataclasses.replace(cfg.curate, eval_fraction=1.5))
    with pytest.raises(ConfigError, match="eval_fraction"):
        run_curate(broken)


def test_streams_a_large_log_quickly(cfg, monkeypatch):
    rng = random.Random(0)
    vocabulary = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in "aeiou"] * 3
    template = turn("q", "a", 0).to_dict()
    records, rated = [], []
    for i in range(20_000):
        prompt = f"question {i}: {' '.join(rng.sample(vocabulary, 12))}?"
        answer = f"answer {i}: {' '.join(rng.sample(vocabulary, 14))}."
        records.append({**template, "id": f"id-{i}", "created_at": at(i / 60), "recorded_at": at(i / 60),
                        "user_hash": f"user{i % 50}", "feedback": {"score": rng.choice([1, 2, 3, 5])} if i % 4 else {},
                        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        if i % 8 == 0:  # unrated turns rated later by an event
            rated.append({"schema_version": 1, "type": "feedback", "id": f"ev-{i}", "created_at": at(20_000),
                          "interaction_id": f"id-{i}", "user_hash": f"user{i % 50}", "feedback": {"score": 5}})
    store.append_jsonl(cfg.raw_log, records + rated)
    real_read_bytes, real_read_text = Path.read_bytes, Path.read_text

    def guarded(real):
        def read(self, *args, **kwargs):
            assert self != cfg.raw_log, "the raw log must be streamed, never read whole"
            return real(self, *args, **kwargs)
        return read

    monkeypatch.setattr(Path, "read_bytes", guarded(real_read_bytes))
    monkeypatch.setattr(Path, "read_text", guarded(real_read_text))
    phases = set()
    manifest = run_curate(cfg, progress=lambda phase, done, total: phases.add(phase))
    c = manifest["counts"]
    assert c["interactions"] == 20_000 and c["feedback_events"] == len(rated)
    assert c["selected"]["helpful"] == sum(1 for r in records if r["feedback"].get("score") == 5) + len(rated)
    assert c["train"] + c["eval"] == c["new_examples"] > 5000
    assert {"reading feedback", "selecting turns"} <= phases  # its speed: bench/bench_curate.py (1M turns)


# --- pure functions -----------------------------------------------------------------------------------
RULES = Rules(blocklist=blocklist_pattern(["bad word"]), min_chars=2, max_chars=50)


@pytest.mark.parametrize("fields, feedback, reason", [
    ({}, {"score": 3}, "neutral"),
    ({}, {}, "unrated"),
    ({"pii_flagged": True}, {"score": 5}, "pii_flagged"),
    ({}, {"score": 5, "private": True}, "private"),
    ({"truncated": True}, {"score": 5}, "truncated"),
    ({"messages": [{"role": "user", "content": "hello there"}]}, {"score": 5}, "malformed"),
    ({"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "   "}]}, {"score": 5}, "empty"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "fine answer"}]}, {"score": 5}, "too_short"),
    ({"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "y" * 51}]}, {"score": 5}, "too_long"),
    ({"messages": [{"role": "user", "content": "say the BAD   word"}, {"role": "assistant", "content": "no"}]}, {"score": 5}, "blocklisted"),
])
def test_select_gives_one_reason_per_dropped_turn(fields, feedback, reason):
    base = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]}
    interaction = Interaction(session_id="s", feedback=Feedback(**feedback), **{**base, **fields})
    assert select(interaction, RULES) == reason


def test_select_kinds_and_blocklist_words():
    base = dict(session_id="s", messages=[{"role": "user", "content": "our class notes"}, {"role": "assistant", "content": "ok then"}])
    assert select(Interaction(feedback=Feedback(score=4), **base), Rules(blocklist=blocklist_pattern(["ass"]))).kind == "helpful"
    assert select(Interaction(feedback=Feedback(), **base), Rules(include_unrated=True)).weight == 0.5
    assert select(Interaction(feedback=Feedback(score=1, correction="better"), truncated=True, **base), Rules()).kind == "corrected"


def ex(prompt: str, answer: str, rank: tuple = (2, 4.0, ""), tool: str | None = None, source: str = "s", user: str = "u") -> Example:
    return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "helpful", 1.0,
                   [source], [user], tool, "2026-01-01T00:00:00Z", rank)


def test_dedupe_keeps_the_best_rated_and_all_sources():
    long_answer = "You can reset it from the account settings page under security, then confirm by email."
    a = ex("How do I reset my password?", long_answer, rank=(2, 4.0, ""), source="a", user="ua")
    b = ex("How can I reset my password?", long_answer, rank=(3, 1.0, ""), source="b", user="ub")
    c = ex("HOW DO I RESET MY PASSWORD?", long_answer, rank=(2, 5.0, ""), source="c", user="uc")
    other = ex("What is the tallest mountain?", "Mount Everest, at about 8,849 metres above sea level.", source="d")
    assert jaccard(shingles(a.text), shingles(b.text)) >= 0.8
    unique, exact = dedupe_exact([a, b, c, other])
    assert exact == 1 and len(unique) == 3
    kept, near = dedupe_near(unique, 0.8)
    assert near == 1 and len(kept) == 2
    survivor = next(e for e in kept if "b" in e.source_ids)
    assert survivor.prompt == "How can I reset my password?"  # corrected outranks helpful
    assert sorted(survivor.source_ids) == ["a", "b", "c"] and survivor.user_hashes == ["ua", "ub", "uc"]


def test_domain_cap_spares_untagged_turns_and_single_domains():
    sql = [ex(f"sql question {i}", "answer", rank=(2, float(i), ""), tool="sql") for i in range(6)]
    shell = [ex(f"shell question {i}", "answer", tool="shell") for i in range(2)]
    plain = [ex(f"plain question {i}", "answer") for i in range(2)]
    kept, capped = cap_domains(sql + shell + plain, 0.5)
    assert [e.prompt for e in capped] == ["sql question 0"] and len(kept) == 9  # the worst-rated goes
    assert cap_domains(sql, 0.5) == (sql, [])
    assert cap_domains(sql + plain, 0.5) == (sql + plain, [])  # untagged chat turns are not a rival domain
    assert cap_domains(plain * 3, 0.1)[1] == []


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["", "?", "!", " please"]), st.integers(0, 3)),
                min_size=2, max_size=30), st.floats(0.05, 0.6), st.integers(0, 3))
def test_split_never_puts_a_prompt_on_both_sides(items, fraction, seed):
    topics = ["reset my password", "install python on windows", "bake sourdough bread", "tie a bowline knot",
              "change a flat tyre", "plant tomato seedlings", "learn the guitar chords"]
    examples = [ex(f"How do I {topics[t]}{tail}", f"answer variant {v} for topic {t}") for t, tail, v in items]
    train, held = pooled_split(examples, fraction, seed, 0.8)  # the split the chain runs
    assert train and len(train) + len(held) == len(examples)
    assert ([e.id for e in train], [e.id for e in held]) == tuple([e.id for e in side] for side in
                                                                  split_eval(examples, fraction, seed, 0.8))
    assert not leaked_prompts(train, held, 0.8)
    assert not {e.prompt_key for e in train} & {e.prompt_key for e in held}


def test_replay_sample_is_seeded_distinct_and_sized():
    pool = [ex(f"prompt {i}", f"answer {i}") for i in range(200)]
    first = sample_replay(pool + pool[:50], 10, "0:1")
    assert len(first) == 10 == len({e.id for e in first})
    assert [e.id for e in first] == [e.id for e in sample_replay(reversed(pool), 10, "0:1")]
    assert [e.id for e in first] != [e.id for e in sample_replay(pool, 10, "0:2")]


# --- CLI and pipeline ---------------------------------------------------------------------------------
def test_cli_curate_and_snapshots(cfg):
    write_corpus(cfg)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["curate", "--json", "--note", "cli run"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["status"] == "created" and manifest["note"] == "cli run"
    assert (cfg.home / manifest["files"]["train"]).exists()

    again = runner.invoke(cli.app, ["curate"])
    assert again.exit_code == 0 and "nothing new to curate" in again.stdout

    listed = runner.invoke(cli.app, ["snapshots", "--json"])
    assert [s["id"] for s in json.loads(listed.stdout)] == [manifest["id"]]
    table = runner.invoke(cli.app, ["snapshots"])
    assert table.exit_code == 0 and manifest["id"] in table.stdout and manifest["sha256"]["train"][:8] in table.stdout

    append(cfg, turn("Which metal is liquid at room temperature?", "Mercury is liquid at room temperature.", 200,
                     feedback={"score": 5}))
    summary = runner.invoke(cli.app, ["curate"])
    assert summary.exit_code == 0 and "train examples" in summary.stdout and "replayed" in summary.stdout


def test_cli_snapshots_empty_and_pipeline_module(cfg):
    assert "no snapshots yet" in CliRunner().invoke(cli.app, ["snapshots"]).stdout
    write_corpus(cfg)
    env = {**os.environ, "CL_HOME": str(cfg.home), "CL_CURATE_BLOCKLIST": "frobnicate"}
    done = subprocess.run([sys.executable, "-m", "continuous_learning.pipeline", "--curate", "--json", "--note", "weekly"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)["curate"]
    assert manifest["status"] == "created" and manifest["counts"]["train"] == 14 and manifest["note"] == "weekly"
    again = subprocess.run([sys.executable, "-m", "continuous_learning.pipeline", "--curate"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing new to curate" in again.stdout
