"""worker_plan: a cold start's model plan, asked for and answered through Ray's key-value store (the suite's real
cluster), planned by the real code; the process that answers is this one. The whole path (prestarted processes,
preload.py) runs in every cold `orch submit` of the suite: test_submit.py, test_spec_errors.py."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from conftest import REPO
from orchestrator import worker_plan
from orchestrator.errors import SpecError
from orchestrator.loader import load_spec
from orchestrator.plan import ModelFacts, offered_resources
from orchestrator.resources import local_resources

DIGITS = REPO / "jobs" / "digits.yaml"


class RayStarted:
    """What facts() asks of the driver's Ray start (cluster.LocalRayStart): Ray is up, its starter thread lives.
    This process is already the suite's Ray driver, so no second in-process Ray can start here."""

    def wait(self) -> None:
        pass

    def starter_alive(self) -> bool:
        return True


@pytest.fixture
def kv(ray_address):
    client = worker_plan._client()
    client.internal_kv_del(b"plan/", True, worker_plan.NAMESPACE)
    yield client
    client.internal_kv_del(b"plan/", True, worker_plan.NAMESPACE)


def _ask(overrides: list[str], processes: int = 2) -> worker_plan.WorkerPlan:
    spec = load_spec(DIGITS, overrides)
    plan = worker_plan.WorkerPlan(spec, str(DIGITS), offered_resources(local_resources()))
    assert plan.asking_with(lambda: processes)() == processes  # the request is posted, then the "prestart"
    return plan


def test_the_first_process_to_claim_the_request_plans_and_the_driver_gets_its_facts(kv):
    plan = _ask([])
    worker_plan.announce()
    planners = [threading.Thread(target=worker_plan.serve) for _ in range(2)]  # two processes' preloads at once
    for planner in planners:
        planner.start()
    for planner in planners:
        planner.join(timeout=120)
    facts = plan.facts(RayStarted())
    assert isinstance(facts, ModelFacts)
    assert facts.parameters.total == 151_498 and facts.memory.peak_bytes > 0
    assert facts.planned_by == f"worker process {os.getpid()}"
    assert "DigitsCNN" in facts.model_summary
    assert kv.internal_kv_get(worker_plan.CLAIM_KEY, worker_plan.NAMESPACE) == str(os.getpid()).encode()


@pytest.mark.parametrize("overrides, fragments", [
    (["model.init_args.chanels=8"], ["model.init_args.chanels", "did you mean 'channels'"]),
    (["model.init_args.channels=-3"], ["building jobs.digits.DigitsCNN", "jobs/digits.py:"]),
])
def test_a_refusal_in_the_worker_reaches_the_driver_as_the_same_spec_error(kv, overrides, fragments):
    plan = _ask(overrides)
    worker_plan.serve()
    with pytest.raises(SpecError) as refused:
        plan.facts(RayStarted())
    text = str(refused.value)
    assert str(DIGITS) in text
    for fragment in fragments:
        assert fragment in text, text


def test_the_driver_plans_itself_when_no_process_will_answer(kv):
    assert _ask([], processes=0).facts(RayStarted()) is None  # the prestart asked for nothing
    plan = _ask([])
    gone = subprocess.Popen(["true"])
    gone.wait()
    kv.internal_kv_put(worker_plan.STARTED_PREFIX + str(gone.pid).encode(), b"", True, worker_plan.NAMESPACE)
    assert plan.facts(RayStarted()) is None  # the only process that began is gone, without an answer
