"""benchmarks/run.py's choice of cases and arms (the harness itself runs on demand, never in this suite)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` as a namespace package

from benchmarks.cases import CASES  # noqa: E402
from benchmarks.run import parse_args, selected  # noqa: E402


def test_arms_cut_a_case_to_its_baseline_and_the_named_arms():
    args = parse_args(["--cases", "step,digits", "--arms", "orch_cold"])
    digits = selected(CASES["digits"], args.arm_names)
    assert list(digits.arms) == ["plain_ddp", "orch_cold"]
    assert {t.arm for t in digits.targets} == {"orch_cold"}  # the warm arm's targets go with it
    assert selected(CASES["step"], args.arm_names) is CASES["step"]  # no arm of step was named: it runs whole


def test_no_arms_runs_every_arm():
    args = parse_args(["--cases", "digits"])
    assert selected(CASES["digits"], args.arm_names) is CASES["digits"]


def test_unknown_arm_is_refused_with_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--cases", "digits", "--arms", "orch_lukewarm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "orch_lukewarm" in err and "orch_cold, orch_warm, plain_ddp" in err
