"""The claims the README makes about IOI on the bundled model (tools/show_ioi.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import show_ioi  # noqa: E402


@pytest.fixture(scope="module")
def shows(bundled):
    return [show_ioi.show(bundled, seed=s) for s in range(4)]


def test_direct_effect_and_last_position_sweep_agree_on_the_heads(shows):
    assert all(len(s.overlap_last) >= 1 for s in shows)
    assert sum(len(s.overlap_last) for s in shows) >= 6  # of 20 top-5 slots


def test_trace_finds_heads_whose_ablation_moves_the_attention(shows):
    up = sum(abs(s.score_after_upstream_ablation - s.score_before) for s in shows) / len(shows)
    weak = sum(abs(s.score_after_weakest_ablation - s.score_before) for s in shows) / len(shows)
    assert up > 1.5 * weak, (up, weak)


def test_act_times_grad_has_the_sign_of_true_patching(shows):
    for s in shows:
        for cid, estimate, true in s.axg_vs_patch:
            assert estimate * true > 0, (cid, estimate, true)
