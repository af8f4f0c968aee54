"""The pooled curate chain (what `cl curate` runs) decides what the list oracle (tests/curate_oracle.py) decides.

Generated rated-turn logs (repeated and near-repeated prompts and answers, every kind of rating, a few domains)
go through `run_curate` in a fresh workspace; the same turns go through `select` and the oracle's list stages.
The snapshot must hold exactly the oracle's train and eval records, in the same order, with no prompt on both
sides of the split."""
from __future__ import annotations

import dataclasses
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from curate_oracle import curate_examples, leaked_prompts
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from continuous_learning.core.records import Feedback, Interaction
from continuous_learning.core.settings import CurateConfig, Settings
from continuous_learning.curate import Example, Rules, run_curate, select
from continuous_learning.storage import store

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)

PROMPTS = [
    "How do I reset my password?",
    "How can I reset my password?",
    "HOW DO I RESET MY PASSWORD?",
    "What is the tallest mountain on Earth?",
    "What is the tallest mountain on Earth today?",
    "Which SQL clause filters groups after aggregation?",
    "How do I bake sourdough bread at home?",
    "Which command shows the git history of a single file?",
]
ANSWERS = [
    "You can reset it from the account settings page under security, then confirm by email.",
    "You can reset it from the account settings page under security, then confirm by e-mail!",
    "Mount Everest, at about 8,849 metres above sea level.",
    "HAVING filters groups produced by GROUP BY, unlike WHERE.",
    "Feed the starter, mix, fold, proof overnight and bake it in a hot oven.",
    "Run git log --follow -- path/to/file to see every commit that touched it.",
]
RATINGS = st.sampled_from([
    {"helpful": True}, {"helpful": False}, {"score": 5}, {"score": 4}, {"score": 3}, {"score": 1}, {},
    {"helpful": False, "correction": "Use the reset link on the sign-in page, then pick a new password."},
])
TURNS = st.lists(st.tuples(st.integers(0, len(PROMPTS) - 1), st.integers(0, len(ANSWERS) - 1), RATINGS,
                           st.sampled_from([None, "sql", "git", "shell"]), st.integers(0, 40),
                           st.sampled_from(["alice", "bob", "carol"])), min_size=1, max_size=24)
CONFIGS = st.builds(CurateConfig, eval_fraction=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
                    domain_cap=st.sampled_from([0.3, 0.5, 1.0]), near_dup_threshold=st.sampled_from([0.7, 0.8, 1.0]),
                    seed=st.integers(0, 3), include_unrated=st.booleans())


def stamp(minutes: int) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def interactions(turns: list[tuple]) -> list[Interaction]:
    return [Interaction(messages=[{"role": "user", "content": PROMPTS[p]},
                                  {"role": "assistant", "content": ANSWERS[a]}],
                        session_id="s1", user_hash=user, feedback=Feedback(**rating), target_tool=tool,
                        created_at=stamp(minute), recorded_at=stamp(minute))
            for p, a, rating, tool, minute, user in turns]


def as_written(examples: list[Example]) -> list[dict]:
    return [orjson.loads(orjson.dumps(e.to_record())) for e in examples]


def read_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turns=TURNS, config=CONFIGS)
def test_the_chain_writes_what_the_oracle_decides(turns, config):
    logged = interactions(turns)
    rules = Rules.from_config(config, now=NOW)
    selected = [o for i in logged if isinstance(o := select(Interaction.from_dict(i.to_dict()), rules), Example)]
    expected = curate_examples(selected, config)
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), curate=config)
        store.append_jsonl(settings.raw_log, [i.to_dict() for i in logged])
        manifest = run_curate(settings, full=True, now=NOW)
        if not expected["new"]:
            assert manifest["status"] == "nothing_new" and manifest["id"] is None
            return
        assert manifest["status"] == "created"
        train, held = (read_lines(settings.home / manifest["files"][side]) for side in ("train", "eval"))
    assert train == as_written(expected["train"])
    assert held == as_written(expected["eval"])
    counts = manifest["counts"]
    assert counts["deduped"] == {"exact": expected["exact"], "near": expected["near"]}
    assert counts["capped"]["total"] == len(expected["capped"])
    assert (counts["new_examples"], counts["train"], counts["eval"]) == (len(expected["new"]), len(train), len(held))
    assert not leaked_prompts([Example.from_record(e) for e in train], [Example.from_record(e) for e in held],
                              config.near_dup_threshold)


def test_the_oracle_sees_the_duplicates_the_generator_makes():
    """The generated vocabulary does exercise near and exact dedupe and the domain cap (else the test above
    would compare empty decisions)."""
    turns = [(0, 0, {"score": 5}, "sql", 1, "alice"), (2, 0, {"helpful": True}, "sql", 2, "bob"),
             (1, 1, {"score": 4}, "sql", 3, "carol"), (3, 2, {"score": 5}, "git", 4, "alice"),
             (5, 3, {"score": 5}, None, 5, "bob"), (7, 5, {"score": 4}, "sql", 6, "bob")]
    config = dataclasses.replace(CurateConfig(), domain_cap=0.3)
    rules = Rules.from_config(config, now=NOW)
    selected = [select(i, rules) for i in interactions(turns)]
    expected = curate_examples(selected, config)
    assert (expected["exact"], expected["near"], len(expected["capped"])) == (1, 1, 1)


WORDS = ["reset", "my", "password", "the", "account", "page", "email", "link", "new", "sign", "in", "now"]


@st.composite
def drifting_prompts(draw) -> list[str]:
    """Prompts that each change one word of an earlier one, in a shuffled order: neighbours match, distant ones
    do not, so components form by chains and a prompt often matches a component's later member but not its first."""
    texts = [draw(st.lists(st.sampled_from(WORDS), min_size=4, max_size=9))]
    for _ in range(draw(st.integers(1, 50))):
        words = list(texts[draw(st.integers(0, len(texts) - 1))])
        words[draw(st.integers(0, len(words) - 1))] = draw(st.sampled_from(WORDS))
        texts.append(words)
    return [" ".join(w) for w in draw(st.permutations(texts))]


@hsettings(max_examples=60, deadline=None)
@given(texts=drifting_prompts(), threshold=st.sampled_from([0.5, 0.7, 0.8]))
def test_near_prompt_groups_are_the_components_of_every_matching_pair(texts, threshold):
    """The split's grouping, which skips pairs already in one component, gives the components that comparing every
    pair sharing an LSH band (the oracle's candidates) gives."""
    from continuous_learning.curate.minhash import BandGroups, NearIndex, earlier_from_keys
    from continuous_learning.curate.split import DisjointSets, _join_near_prompts
    from continuous_learning.curate.text import jaccard, shingles

    keys = NearIndex(threshold).band_keys(texts)
    every_pair = DisjointSets()
    for position, earlier in earlier_from_keys(keys).items():
        for j in earlier:
            if jaccard(shingles(texts[position]), shingles(texts[j])) >= threshold:
                every_pair.join(position, j)
    skipping = DisjointSets()
    _join_near_prompts(skipping, BandGroups(keys), list(range(len(texts))), lambda k: shingles(texts[k]), threshold)

    def partition(sets: DisjointSets) -> set[frozenset[int]]:
        by_root: dict[int, set[int]] = {}
        for i in range(len(texts)):
            by_root.setdefault(sets.root(i), set()).add(i)
        return {frozenset(members) for members in by_root.values()}

    assert partition(skipping) == partition(every_pair)
