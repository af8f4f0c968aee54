"""The loop on the real bundled model, on DEFAULT settings: a second round of six new facts on top of the shared
first round (learning_round.py), checked by the plain-PEFT peer. Ordered near the end (conftest), so the worker that
did not train the first round picks it up."""
from __future__ import annotations

import pytest
from learning_facts import GARDEN, OFFICE
from learning_round import Peer, copy_of_first_round, teach

pytestmark = pytest.mark.real_model


def test_a_second_round_learns_new_facts_and_the_gate_guards_the_first(first_round, real_home):
    """The target is a promoted second round that keeps at least 4 of the first six facts. Runs so far learn 4 new
    ones and keep 3 or 4 of the first six, and the gate refuses the ones that lost too many (README, How the loop
    learns: a known gap). What must hold meanwhile: the round warm-starts from the champion, learns the new facts,
    and is promoted only if the first ones survive."""
    with copy_of_first_round(first_round, real_home, "second_round") as second:
        report = teach(second, GARDEN, OFFICE + GARDEN)
    assert report["train"]["parent"] == report["eval"]["against"]["version"]  # warm-started from the champion
    peer = Peer(second, report["train"]["version"])
    assert peer.recalled(GARDEN, "You are a helpful assistant.") >= 3  # the base and the champion know none
    kept = peer.recalled(OFFICE, "You are a helpful assistant.")
    assert kept >= 4 or report["eval"]["promoted"] is False, report["eval"]["decision"]["summary"]
