"""The gate on the real bundled model, on DEFAULT settings: a candidate taught answers that contradict the champion
is refused. Runs last (conftest orders it so), on whichever worker is free, from the shared first round."""
from __future__ import annotations

import pytest
from learning_facts import OFFICE
from learning_round import copy_of_first_round, teach

from continuous_learning import registry
from continuous_learning.core.settings import load_settings

pytestmark = pytest.mark.real_model


def test_a_candidate_taught_wrong_answers_is_refused(first_round, real_home):
    """Half the champion's facts contradicted (a shorter run than all six would take; the gate sees them all)."""
    with copy_of_first_round(first_round, real_home, "wrong_answers") as wrong:
        champion = registry.load(load_settings(home=wrong))["champion"]
        report = teach(wrong, OFFICE[:3], OFFICE, contradict=True)
        assert report["eval"]["promoted"] is False
        decision = report["eval"]["decision"]
        assert decision["promote"] is False and "not promoted" in decision["summary"]
        assert registry.load(load_settings(home=wrong))["champion"] == champion
