"""The loop on the real bundled model, on DEFAULT settings, checked the way an outsider checks it: plain
transformers + PEFT load the promoted adapter and answer paraphrased questions under several system prompts,
and everyday questions the gate never saw must still be answered.

Round one teaches six facts (a dozen rated turns). Round two (test_learning_second_round.py) teaches six others on
top, and a candidate fed answers that contradict round one must be refused (test_learning_refusal.py): both start
from the one shared first round (learning_round.py), each on whichever worker is free once it is trained."""
from __future__ import annotations

import pytest

from continuous_learning import registry
from continuous_learning.core.settings import load_settings
from learning_facts import NAMED, OFFICE
from learning_round import SYSTEM_PROMPTS, Peer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def first_peer(first_round):
    home, report = first_round
    return Peer(home, report["train"]["version"])


def test_a_dozen_rated_turns_are_learned_and_promoted_on_defaults(first_round, first_peer):
    home, report = first_round
    assert report["eval"]["promoted"] is True, report["eval"]["decision"]["summary"]
    assert report["eval"]["subject"]["passed"] >= 5
    # The target is 5 of 6 under any prompt; runs recall 5-6 under the prompts and 4-6 under the third, which
    # training never saw (README, How the loop learns). Without training, the base recalls none.
    for system in SYSTEM_PROMPTS:
        assert first_peer.recalled(OFFICE, system) >= 4, system
    base = Peer(home, None)
    assert base.recalled(OFFICE, SYSTEM_PROMPTS[1]) < 4  # the bound above is not met without learning
    kept, before = first_peer.everyday("You are a helpful assistant."), base.everyday("You are a helpful assistant.")
    # The target is at most 1 of 20 lost; runs on the 135M model lost 0 to 3 of these 25 (README, How the loop
    # learns). Without the KL term a quarter is lost, which this bound still catches.
    assert sum(b and not k for k, b in zip(kept, before)) <= 3


def test_trained_adapters_never_write_placeholders(first_round, first_peer):
    """The stored answers say "approved by <PERSON> in the finance office"; the placeholder is masked from the loss,
    so the adapter learns the rest of the answer but never learns to write `<PERSON>`."""
    home, report = first_round
    snapshot = registry.find_snapshot(registry.load(load_settings(home=home)), report["curate"]["id"])
    assert "<PERSON>" in (home / snapshot["file"]).read_text()
    prompts = [prompt for turns, *_ in NAMED for prompt, _ in turns] + [question for _, question, _, _ in NAMED]
    for system in SYSTEM_PROMPTS:
        for answer in first_peer.answers(prompts, system):
            assert "<" not in answer and "person>" not in answer.lower(), answer
