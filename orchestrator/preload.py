"""Imported by Ray in each new worker process (RAY_preload_python_modules): warms processes kept for the next job.

Only a process prestarted for no job by orchestrator.warm_pool imports anything: it has ORCH_WARM in its
environment (every job of ours sets it, to the tier of the actor that had such a process) and Ray's nil job id.
A process started on demand for a running job, or for someone else's job, returns at once: it would only import
them later, or never. A process prestarted for a cold start's workers also plans the job's model, if its driver
asked and no sibling claimed it first (worker_plan.py): the cluster, and so that process, is the driver's own.
"""

import importlib
import os

from orchestrator.warm_pool import COLD_WORKER_TIER, TIER_ENV_VAR, WARM_IMPORTS  # light: no Ray, torch or MLflow

NIL_JOB_ID = "ffffffff"
warmed = False  # read by the worker (worker.py): this process was kept warm for the job that took it

_tier = os.environ.get(TIER_ENV_VAR)
if _tier in WARM_IMPORTS and os.environ.get("RAY_JOB_ID", NIL_JOB_ID) == NIL_JOB_ID:
    if _tier == COLD_WORKER_TIER:  # a cold start's driver may be waiting for its model's plan (worker_plan.py)
        from orchestrator import worker_plan

        worker_plan.announce()
    for _name in WARM_IMPORTS[_tier]:
        try:
            importlib.import_module(_name)
        except Exception:  # a module missing here is imported (and its error shown) where the job needs it
            pass
    if _tier == COLD_WORKER_TIER:
        worker_plan.serve()
    warmed = True
