"""The benchmark harness (contract keys, merging) and the fast paths it proves: the sanitizer's screens, the
curate MinHash/LSH and hot-path shortcuts."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from continuous_learning import curate
from continuous_learning.capture import privacy, screens
from continuous_learning.core.records import Feedback, Interaction
from continuous_learning.core.settings import CurateConfig, PrivacyConfig

REPO = Path(__file__).resolve().parents[1]
CORPUS = [json.loads(line) for line in (REPO / "tests" / "data" / "pii_corpus.jsonl").read_text().splitlines()
          if line.strip()]
ENTITIES = PrivacyConfig().entities
CONTRACT = ("workload", "baseline", "goal", "ratio", "goal_met", "raw", "where_time_goes")


# --- the harness ---------------------------------------------------------------------------------------------
def test_partial_bench_writes_its_own_file_and_never_touches_a_whole_run(tmp_path: Path) -> None:
    whole = {"kind": "whole", "workloads": {"other": {"workload": "kept", "ratio": 1.0, "goal_met": True}}}
    (tmp_path / "results.json").write_text(json.dumps(whole))
    env = {**os.environ, "CL_BENCH_MODEL_CACHE": os.environ.get("CL_TEST_MODEL_CACHE", str(tmp_path / "models"))}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--repeats", "1", "--only", "rollback,sanitize",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text()) == whole
    assert not (tmp_path / "RESULTS.md").exists()
    doc = json.loads((tmp_path / "results-partial.json").read_text())
    assert doc["kind"] == "partial" and set(doc["workloads"]) == {"rollback", "sanitize"}
    assert len(doc["commit"]["sha"]) == 40 and isinstance(doc["commit"]["dirty"], bool)
    assert {"python", "cores", "versions"} <= set(doc["machine"])
    for name in ("rollback", "sanitize"):
        entry = doc["workloads"][name]
        assert all(key in entry for key in CONTRACT), entry
        assert isinstance(entry["ratio"], float) and entry["ratio"] > 0
        low, high = entry["ratio_spread"]
        assert low <= entry["ratio"] <= high
        assert entry["quick"] is True and entry["where_time_goes"]
    sanitize = doc["workloads"]["sanitize"]["raw"]
    assert sanitize["corpus_recall_ours"]["recall"] >= sanitize["corpus_recall_stock"]["recall"]
    assert sum(sanitize["screen_stages"].values()) == sanitize["texts"]
    rollback = doc["workloads"]["rollback"]["raw"]
    assert rollback["versions"] == 20 and len(rollback["stdlib_floor_s"]) == len(rollback["cli_rollback_s"])
    markdown = (tmp_path / "RESULTS-partial.md").read_text()
    assert "## rollback" in markdown and "## sanitize" in markdown and "Where the time goes" in markdown
    assert doc["commit"]["sha"] in markdown and "partial run" in markdown


def test_gpu_bench_says_plainly_when_there_is_no_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU benchmark would run for minutes")
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU" in proc.stdout and "nothing was measured" in proc.stdout
    doc = json.loads((tmp_path / "results-gpu.json").read_text())
    assert doc["kind"] == "gpu" and doc["workloads"]["gpu"]["no_gpu"] is True
    assert "no CUDA GPU" in (tmp_path / "RESULTS-gpu.md").read_text()


def test_paired_ratios_are_per_repeat_with_median_and_spread() -> None:
    from bench.common import paired_ratios

    ratios = paired_ratios([10.0, 30.0, 20.0], [5.0, 10.0, 10.0])
    assert ratios == {"per_repeat": [2.0, 3.0, 2.0], "median": 2.0, "min": 2.0, "max": 3.0}
    assert paired_ratios([1.0], [0.0])["median"] is None


def test_profile_by_file_partitions_the_time_among_that_files_functions() -> None:
    import time

    from pyinstrument import Profiler

    from bench.common import summarise_by_file

    def outer() -> None:
        end = time.perf_counter() + 0.15
        while time.perf_counter() < end:
            sum(range(200))  # a builtin: charged to outer
        inner()

    def inner() -> None:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            sum(range(200))

    profiler = Profiler(interval=0.001)
    profiler.start()
    outer()
    profiler.stop()
    shares = {name: int(share.rstrip("%")) for name, share in
              (part.rsplit(" ", 1) for part in summarise_by_file(profiler.last_session, "test_bench.py").split("; "))}
    assert shares["inner"] > shares["outer"] > 0  # inner's time is not counted again in outer's
    assert 97 <= sum(shares.values()) <= 103


def test_unknown_workload_is_one_clear_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown workload(s) nope" in proc.stderr and "Traceback" not in proc.stderr


# --- sanitizer screens ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sanitizer() -> privacy.Sanitizer:
    return privacy.get_sanitizer(PrivacyConfig()).load()


def _stage(sanitizer: privacy.Sanitizer, text: str) -> str:
    stages: Counter = Counter()
    sanitizer.sanitize_many([text], stages)
    assert sum(stages.values()) == 1
    return next(stage for stage, n in stages.items() if n)


def test_screens_run_only_what_a_text_needs(sanitizer: privacy.Sanitizer) -> None:
    assert _stage(sanitizer, "thanks, that worked") == privacy.SKIP
    assert _stage(sanitizer, "How do I reset it? I tried twice.") == privacy.PATTERNS  # the cue regexes only
    assert _stage(sanitizer, "Firmware v2.4.1 is installed on line 4 at 12:30.") == privacy.PATTERNS
    assert _stage(sanitizer, "Maria approved it.") == privacy.NER  # a name opening the text
    assert _stage(sanitizer, "Can you ask Will?") == privacy.NER  # "Will" is a listed first name
    assert _stage(sanitizer, "I need the <API_KEY> for PX-3301") == privacy.PATTERNS  # placeholders and codes
    assert _stage(sanitizer, "reach me at a@b.io") == privacy.PATTERNS
    assert _stage(sanitizer, "Call John on 555-123-4567") == privacy.NER + "+context"  # phone context words
    email_only = privacy.Sanitizer(PrivacyConfig(entities=["EMAIL_ADDRESS"])).load()
    assert _stage(email_only, "Maria wrote") == privacy.SKIP


def test_an_unscreened_entity_type_gets_the_whole_pipeline() -> None:
    other = privacy.Sanitizer(PrivacyConfig(entities=["EMAIL_ADDRESS", "LOCATION"])).load()
    assert _stage(other, "anything") == privacy.FULL
    text = "I moved to Paris, write to a@b.io"
    assert other.sanitize_many([text]) == [other.sanitize_unscreened(text)]


def test_repeats_are_analysed_once_and_returned_as_copies(sanitizer: privacy.Sanitizer) -> None:
    stages: Counter = Counter()
    out = sanitizer.sanitize_many(["Ask Maria", "ok", "Ask Maria"], stages)
    assert stages[privacy.REPEAT] == 1 and out[0] == out[2] and out[0] is not out[2]
    assert out[0].text == "Ask <PERSON>"


@pytest.mark.parametrize("row", [r for r in CORPUS if r["pii"]], ids=lambda r: r["text"][:30])
def test_every_corpus_entity_reaches_analysis(sanitizer: privacy.Sanitizer, row: dict) -> None:
    assert _stage(sanitizer, row["text"]) != privacy.SKIP


def test_ner_spans_need_a_name_word() -> None:
    text = "Firmware Update by Kenji Watanabe, WILL SMITH and Ivan. The Torque"
    def span(value: str) -> tuple[int, int]:
        start = text.index(value)
        return start, start + len(value)
    for kept in ("Kenji Watanabe", "WILL SMITH", "Ivan"):
        assert screens.has_name_word(text, *span(kept)), kept
    for dropped in ("Firmware Update", "The", "Torque", "Kenj"):  # dictionary words, an opener, a cut word
        assert not screens.has_name_word(text, *span(dropped)), dropped


def _unscreened(sanitizer: privacy.Sanitizer, text: str) -> privacy.Sanitized:
    """The full pipeline on one text through Presidio's AnalyzerEngine, as before the screens existed."""
    return sanitizer.sanitize_unscreened(text)


WORDS = sorted({w for row in CORPUS for w in row["text"].split()} | set("the it please ok".split()))
FILLER = st.lists(st.sampled_from("the line is down again please check it and tell me what to do today".split()),
                  min_size=0, max_size=8).map(" ".join)
PII_VALUES = [value for row in CORPUS for value in row["pii"]]


@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), lower=st.booleans())
@example(words=["signed", "Charge", "Call", "(415)"], lower=False)  # a cue match under a dropped NER span
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_screened_batches_match_the_full_pipeline(sanitizer: privacy.Sanitizer, words: list[str], lower: bool) -> None:
    text = " ".join(words).lower() if lower else " ".join(words)
    assert sanitizer.sanitize_many([text])[0] == _unscreened(sanitizer, text)


@given(before=FILLER, after=FILLER, value=st.sampled_from(PII_VALUES), capitalise=st.booleans())
@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_screens_never_change_what_is_found(sanitizer: privacy.Sanitizer, before: str, after: str, value: str,
                                            capitalise: bool) -> None:
    text = f"{before} {value} {after}".strip()
    text = text[:1].upper() + text[1:] if capitalise else text
    assert sanitizer.sanitize_many([text])[0] == _unscreened(sanitizer, text)


def test_corpus_results_match_the_full_pipeline(sanitizer: privacy.Sanitizer) -> None:
    texts = [row["text"] for row in CORPUS]
    texts += [f"{a} {b}" for a, b in zip(texts, reversed(texts))] + texts[:5]  # mixed lines and exact repeats
    assert sanitizer.sanitize_many(texts) == [_unscreened(sanitizer, t) for t in texts]


# --- curate fast paths -----------------------------------------------------------------------------------------
def test_signatures_do_not_depend_on_chunking() -> None:
    rng = random.Random(1)
    texts = ["".join(rng.choice("abcdé𝄞 ") for _ in range(rng.randint(0, 60))) for _ in range(300)]
    together = list(curate._signatures(texts))
    alone = [next(curate._signatures([t])) for t in texts]
    assert all((a == b).all() for a, b in zip(together, alone))
    assert (together[0] == next(curate._signatures([texts[0]]))).all()


def test_near_index_finds_near_duplicates_and_ignores_strangers() -> None:
    rng = random.Random(2)
    words = ["".join(rng.choice("bcdfghklmnprstv") + rng.choice("aeiou") for _ in range(3)) for _ in range(400)]
    base = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    variants = [t.rsplit(" ", 1)[0] + " zzz" for t in base]  # one word changed: Jaccard well above 0.8
    index = curate.NearIndex.of(base, 0.8)
    found = index.matches_any(variants)
    assert all(curate.jaccard(curate.shingles(a), curate.shingles(b)) >= 0.8 for a, b in zip(base, variants))
    assert sum(found) >= 198  # LSH may miss a rare pair; the exact check never accepts a wrong one
    strangers = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    assert not any(index.matches_any(strangers))


OPTIONAL = st.none() | st.booleans()
FEEDBACK = st.builds(Feedback, score=st.none() | st.integers(1, 5), helpful=OPTIONAL,
                     comment=st.none() | st.text(max_size=5),
                     correction=st.none() | st.text(max_size=5), private=OPTIONAL)


@given(a=FEEDBACK, b=FEEDBACK)
def test_merge_feedback_equals_merged(a: Feedback, b: Feedback) -> None:
    assert curate.merge_feedback(a, b) == a.merged(b)


MESSAGES = st.sampled_from([
    [{"role": "user", "content": "How do I reset it?"}, {"role": "assistant", "content": "Hold the button."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}],
    "not a list",
])


@given(messages=MESSAGES, flagged=st.sampled_from([False, True, 1, 0, None]), truncated=st.booleans())
def test_unrated_shortcut_gives_the_reason_select_gives(messages, flagged, truncated) -> None:
    record = Interaction(messages=[], session_id="s").to_dict()
    record.update(messages=messages, pii_flagged=flagged, truncated=truncated)
    rules = curate.Rules.from_config(CurateConfig())
    shortcut = curate._plain_unrated_reason(record, {}, rules)
    try:  # as curate's full path does: a record that cannot be read is malformed
        full = curate.select(Interaction.from_dict(record), rules)
    except (TypeError, ValueError, KeyError, AttributeError):
        full = "malformed"
    assert shortcut is None or shortcut == full


def test_sorted_band_candidates_equal_probing_an_incremental_index() -> None:
    rng = random.Random(3)
    pool = ["".join(rng.choice("abc ") for _ in range(30)) for _ in range(40)]
    texts = [rng.choice(pool) + rng.choice(["", "x", "yz"]) for _ in range(300)]
    index = curate.NearIndex(0.8)
    expected: dict[int, list[int]] = {}
    for i, keys in enumerate(index.signatures(texts)):
        found = sorted(index.candidates(keys))
        if found:
            expected[i] = found
        index.add(i, texts[i], keys)
    assert curate.NearIndex(0.8).earlier_candidates(texts) == expected


def test_greedy_batch_answers_like_generate_one_by_one(workspace: Path) -> None:
    from continuous_learning.evaluate import common_prefix, greedy_batch
    from continuous_learning.chat.models import ChatModel
    from continuous_learning.core.settings import load_settings

    assert common_prefix([[1, 2, 3], [1, 2, 4, 5]]) == 2 and common_prefix([[1, 2], [1, 2, 3]]) == 1
    chat = ChatModel.load(load_settings())
    questions = ("Hi", "What is the capital of France?", "Name a colour.")
    conversations = [[{"role": "user", "content": q}] for q in questions]
    one_by_one = chat.generate_batch(conversations, max_new_tokens=8, batch_size=1)
    assert greedy_batch(chat, conversations[:1], 8) == one_by_one[:1]  # one row: no padding, same arithmetic
    assert len(greedy_batch(chat, conversations, 8)) == 3
