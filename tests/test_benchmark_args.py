"""benchmarks/run.py's choice of cases and arms (the harness itself runs on demand, never in this suite)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` as a namespace package

from benchmarks.cases import CASES  # noqa: E402
from benchmarks.run import parse_args, selected  # noqa: E402


def test_arms_cut_a_case_to_its_baseline_and_the_named_arms():
    args = parse_args(["--cases", "step,digits", "--arms", "orch"])
    step = selected(CASES["step"], args.arm_names)
    assert list(step.arms) == ["lightning", "orch"]  # plain PyTorch dropped, the baseline kept
    assert {t.arm for t in step.targets} == {"orch"}
    assert selected(CASES["digits"], args.arm_names) is CASES["digits"]  # no arm of digits was named: it runs whole


def test_cold_and_warm_digits_are_separate_cases_with_their_own_baseline():
    assert set(CASES["digits"].arms) == {"plain_ddp", "orch_cold"}  # no warm cluster beside the cold arm
    assert set(CASES["digits_warm"].arms) == {"plain_ddp", "orch_warm"}
    assert {t.arm for t in CASES["digits"].targets} == {"orch_cold"}
    assert {t.arm for t in CASES["digits_warm"].targets} == {"orch_warm"}


def test_no_arms_runs_every_arm():
    args = parse_args(["--cases", "digits"])
    assert selected(CASES["digits"], args.arm_names) is CASES["digits"]


def test_unknown_arm_is_refused_with_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--cases", "digits", "--arms", "orch_lukewarm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "orch_lukewarm" in err and "orch_cold, plain_ddp" in err
