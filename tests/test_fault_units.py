"""Fast checks of the fault-tolerance parts without Ray: exact resume in plain Lightning, the metric gate and
sender against a real MLflow store, and the CLI's refusals before anything starts."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import ASSETS, run_orch

sys.path.insert(0, str(ASSETS / "faults_project"))
from faulty import Blobs, NoisyMLP  # noqa: E402

from orchestrator.determinism import ExactResume  # noqa: E402

SEED = 7


class _Trace(pl.Callback):
    """The samples each step trained on, to compare data order as well as weights."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.global_step, batch[1].tolist()))


class _SaveAt(pl.Callback):
    def __init__(self, path: Path, step: int | None = None, epoch_end: int | None = None):
        self.path, self.step, self.epoch_end = path, step, epoch_end

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)

    def on_train_epoch_end(self, trainer, *args):
        if trainer.current_epoch == self.epoch_end:
            trainer.save_checkpoint(self.path)


class _CrashAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def _fit(callbacks, ckpt_path=None, exact=True):
    pl.seed_everything(SEED, verbose=False)
    model = NoisyMLP(lr=0.05, dropout=0.3)
    trace = _Trace()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=0.5,
                         callbacks=[*callbacks, trace, *([ExactResume(SEED)] if exact else [])])
    try:
        trainer.fit(model, datamodule=Blobs(n=200, batch_size=16), ckpt_path=ckpt_path)
    except RuntimeError as exc:
        assert "crash" in str(exc)
    return model, trace.steps


def _max_difference(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# 13 batches per epoch; validation after batch 6 and at the end of each epoch.
@pytest.mark.parametrize("where", [dict(step=17), dict(step=6), dict(step=13), dict(epoch_end=0)],
                         ids=["mid-epoch", "before-mid-epoch-validation", "last-batch", "epoch-end"])
def test_resume_from_any_checkpoint_is_exact(tmp_path, where):
    reference, reference_steps = _fit([])
    _fit([_SaveAt(tmp_path / "c.ckpt", **where), _CrashAt(22)])
    resumed, resumed_steps = _fit([], ckpt_path=tmp_path / "c.ckpt")
    first = resumed_steps[0][0]
    assert resumed_steps == [s for s in reference_steps if s[0] >= first]  # same samples, same order, none twice
    assert _max_difference(reference, resumed) == 0.0


def test_without_exact_resume_lightning_alone_diverges(tmp_path):
    """The guard above is not vacuous: Lightning by itself replays consumed batches and redraws dropout."""
    reference, _ = _fit([], exact=False)
    _fit([_SaveAt(tmp_path / "c.ckpt", step=17), _CrashAt(22)], exact=False)
    resumed, _ = _fit([], ckpt_path=tmp_path / "c.ckpt", exact=False)
    assert _max_difference(reference, resumed) > 1e-3


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_sender_never_sends_a_step_twice_across_attempts(tracking_uri):
    from mlflow import MlflowClient

    from orchestrator.tracking.sender import MetricSender

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("units")).info.run_id
    first = MetricSender(tracking_uri, run_id, interval_s=0.05)
    for step in range(6):
        first.add({"loss": float(step)}, step)
    first.add({"loss": 99.0}, 5)  # a second value for a step already queued: dropped
    assert first.close(10)
    restarted = MetricSender(tracking_uri, run_id, interval_s=0.05, resumed=True)
    for step in range(3, 9):
        restarted.add({"loss": 100.0 + step}, step)
    assert restarted.close(10)
    assert _history(client, run_id, "loss") == [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in (6, 7, 8)]


def test_a_worker_leaves_a_new_store_to_the_driver(tracking_uri, migrated_store):
    """Until the driver has opened the run, rank 0's sender makes no MLflow client: making one opens the store, and
    a new sqlite store's tables are made by whoever opens it first. On a busy machine the sender got there while the
    driver's low-priority thread was still migrating the same file, and the driver's run failed to open ("Online
    migration expected to match one row")."""
    import shutil
    import threading
    import time

    from mlflow import MlflowClient

    from orchestrator.tracking.sender import MetricSender

    store = Path(tracking_uri.removeprefix("sqlite:///"))
    opened, posted = threading.Event(), {}

    def run_id_from_the_driver() -> str:  # as worker.RunIdFromBoard: waits until the driver posts it
        assert opened.wait(60)
        return posted["run_id"]

    sender = MetricSender(tracking_uri, run_id_from_the_driver, interval_s=0.05)
    sender.add({"loss": 1.0}, step=0)
    sender.set_tags({"orch.hostnames": "here"})
    time.sleep(1.0)  # some twenty wake-ups of the sender's thread, each with something to send
    assert not store.exists(), "the sender opened the store before the run existed"
    shutil.copyfile(migrated_store, store)  # the driver opens it: the schema, then the run
    client = MlflowClient(tracking_uri)
    posted["run_id"] = client.create_run(client.create_experiment("new-store")).info.run_id
    opened.set()
    assert sender.close(30)
    assert _history(client, posted["run_id"], "loss") == [(0, 1.0)]
    assert client.get_run(posted["run_id"]).data.tags["orch.hostnames"] == "here"


def test_a_driver_waits_for_the_schema_another_driver_is_making(tracking_uri, migrated_store):
    """Two drivers on one new sqlite store (a user's sweep in a new folder) both run MLflow's migrations on it; the
    one that finds the schema half made waits for the other to finish it. A schema that never comes right stops
    the job with the store named, not a traceback from alembic."""
    import shutil
    import sqlite3
    import threading
    import time

    from orchestrator.tracking.run import RunRecord, TrackingUnavailable, open_client

    store = Path(tracking_uri.removeprefix("sqlite:///"))
    shutil.copyfile(migrated_store, store)
    with sqlite3.connect(store) as db:
        ((head,),) = db.execute("select version_num from alembic_version").fetchall()
        db.execute("update alembic_version set version_num = '451aebb31d03'")  # an earlier of MLflow's revisions
    with pytest.raises(TrackingUnavailable, match=r"cannot open the MLflow store sqlite:///.*out-of-date database"):
        open_client(tracking_uri, patience_s=0.5)

    def other_driver_finishes() -> None:
        time.sleep(1.5)
        with sqlite3.connect(store) as db:
            db.execute("update alembic_version set version_num = ?", (head,))

    other = threading.Thread(target=other_driver_finishes)
    other.start()
    record = RunRecord(tracking_uri, "sweep", None, {})
    other.join()
    assert record.client.get_run(record.run_id).info.status == "RUNNING"


def test_training_side_of_the_sender_never_imports_mlflow(tracking_uri):
    """Rank 0's training thread creates the logger's sender and adds metrics and tags; MLflow (~2 s of CPU to
    import and open a store) is the sender thread's to import, or it would delay rank 0's first step while the
    other ranks wait. A fresh interpreter, since this test session imported MLflow long ago."""
    import subprocess

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("lazy")).info.run_id
    script = f"""
import sys, time
from orchestrator.tracking.gate import MetricGate
from orchestrator.tracking.sender import MetricSender
sender = MetricSender({tracking_uri!r}, {run_id!r}, interval_s=3600)
gate = MetricGate(sender)
gate.commit(5)
gate.add({{"loss": 0.5}}, step=1)
sender.add({{"lr": 0.1}}, step=1)
sender._wake.clear()  # only flush() may wake the thread now
assert "mlflow" not in sys.modules, sorted(m for m in sys.modules if m.startswith("mlflow"))[:5]
# Then every thread that may be first to need MLflow at once, as in a worker: the senders' threads (the logger's,
# a node sampler's) and the sampler's own, which asks for the client; first imports racing break MLflow.
import threading
samplers = [MetricSender({tracking_uri!r}, {run_id!r}, interval_s=3600) for _ in range(2)]
for index, other in enumerate(samplers):
    other.add({{f"system/{{index}}": 1.0}}, step=0)
errors = []
def first_use(action):
    try:
        action()
    except BaseException as exc:
        errors.append(repr(exc))
actions = [lambda: samplers[0].client, sender._send_all, lambda: samplers[1].client, samplers[0]._send_all]
threads = [threading.Thread(target=first_use, args=(action,)) for action in actions]
for thread in threads:  # a few ms apart, as in a worker: started together, the first import wins the race
    thread.start()
    time.sleep(0.005)
for thread in threads:
    thread.join()
assert not errors, errors
assert all(other.flush(60) for other in [sender, *samplers]), "a sender's thread did not deliver"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _history(client, run_id, "loss") == [(1, 0.5)] and _history(client, run_id, "lr") == [(1, 0.1)]
    assert _history(client, run_id, "system/0") == [(0, 1.0)] and _history(client, run_id, "system/1") == [(0, 1.0)]


def test_gate_holds_metrics_until_their_checkpoint_commits(tracking_uri, tmp_path):
    from mlflow import MlflowClient

    from orchestrator.tracking.gate import MetricGate, read_sidecar, write_sidecar
    from orchestrator.tracking.sender import MetricSender

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("units")).info.run_id
    sender = MetricSender(tracking_uri, run_id, interval_s=0.05)
    gate = MetricGate(sender)
    for step in range(10):
        gate.add({"loss": float(step)}, step)
    assert sender.flush(5) and _history(client, run_id, "loss") == []  # nothing is covered yet
    carried = gate.durable(covered_step=4)
    assert [m.step for m in carried] == [0, 1, 2, 3, 4]
    write_sidecar(tmp_path, carried)
    assert [(m.key, m.step, m.value) for m in read_sidecar(tmp_path)] == [("loss", s, float(s)) for s in range(5)]
    gate.commit_when(4, wait=lambda: None)  # Ray's commit barrier returned
    gate.finish(success=False)  # a retried attempt: steps 5..9 are left to the re-run
    assert sender.close(10)
    assert [s for s, _ in _history(client, run_id, "loss")] == [0, 1, 2, 3, 4]

    final = MetricGate(MetricSender(tracking_uri, run_id, interval_s=0.05, resumed=True))
    final.replay(read_sidecar(tmp_path))  # already in MLflow: dropped
    for step in range(5, 8):
        final.add({"loss": float(step)}, step)
    final.final = True  # no retry left: the curve up to the failure is kept
    final.finish(success=False)
    assert final.sender.close(10)
    assert [s for s, _ in _history(client, run_id, "loss")] == list(range(8))


def test_unwritable_checkpoint_location_fails_before_anything_starts(orch_env, tracking_uri, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**orch_env, "RAY_ADDRESS": "127.0.0.1:1"}  # reaching for Ray would fail differently
    result = run_orch(["submit", str(ASSETS / "faults_project" / "job.yaml"),
                       f"checkpoint.storage_path={blocker}/ckpt"], env=env, cwd=ASSETS / "faults_project", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "checkpoint.storage_path" in result.stderr and "cannot write checkpoints" in result.stderr
    assert str(blocker) in result.stderr
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()  # no run was opened


def test_resume_refuses_clearly(orch_env, tracking_uri, tmp_path):
    from mlflow import MlflowClient

    from orchestrator.resume import ResumeError, find_target

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("resume-errors")
    env = {**orch_env, "RAY_ADDRESS": "127.0.0.1:1"}
    unknown = run_orch(["resume", "0123456789abcdef"], env=env, cwd=tmp_path, timeout=120)
    assert unknown.returncode == 2 and "no MLflow run or job '0123456789abcdef'" in unknown.stderr

    def refusal(run_id: str) -> str:
        with pytest.raises(ResumeError) as raised:
            find_target(run_id, tracking_uri)
        return str(raised.value)

    assert "was not started by `orch submit`" in refusal(client.create_run(experiment).info.run_id)
    tags = {"orch.ray_run_name": "job_x", "orch.storage_path": str(tmp_path / "ckpt")}
    finished = client.create_run(experiment, tags=tags).info.run_id
    client.set_terminated(finished, "FINISHED")
    assert "already FINISHED" in refusal(finished)
    failed = client.create_run(experiment, tags=tags).info.run_id
    client.log_text(failed, (ASSETS / "faults_project" / "job.yaml").read_text(), "spec/resolved.yaml")
    client.set_terminated(failed, "FAILED")
    assert "no longer exists" in refusal(failed)
    (tmp_path / "ckpt" / "job_x").mkdir(parents=True)
    assert "never committed a checkpoint" in refusal(failed)
    assert client.get_run(failed).info.status == "FAILED"  # untouched
    import socket
    import subprocess

    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "orch", "submit"])
    try:
        alive = client.create_run(experiment, tags={**tags, "orch.driver_host": socket.gethostname(),
                                                    "orch.driver_pid": str(driver.pid)}).info.run_id
        assert "is still running" in refusal(alive)
    finally:
        driver.kill()
        driver.wait()


def test_a_dead_controller_reads_as_a_sentence_that_says_how_to_go_on():
    """Ray Train restarts workers, not its controller; its death is Ray's plumbing and must not read as a traceback.
    (Seen end to end: SIGKILL to the controller mid-run left a FAILED run, no placement group, and `orch resume`
    finished the job from its last checkpoint.)"""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    from orchestrator.recovery import describe_failure

    died = ActorDiedError(ActorDiedErrorContext(
        class_name="TrainController", actor_id=bytes(16), pid=4242, node_ip_address="10.0.0.7",
        error_message="The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker "
                      "exit detail: Worker unexpectedly exits with a connection error code 2. End of file. Some "
                      "common causes include: (1) the process was killed by the OOM killer"))
    text = describe_failure(died, "abc123")
    assert text.startswith("Ray Train's controller process (pid 4242 on 10.0.0.7) died: Worker unexpectedly exits "
                           "with a connection error code 2. End of file. Ray restarts"), text
    assert "`orch resume abc123`" in text
    worker = ActorDiedError(ActorDiedErrorContext(class_name="RayTrainWorker", actor_id=bytes(16)))
    assert describe_failure(worker, "abc123") is None  # the user's traceback (or Ray's) is shown as it is


def test_lightning_sigterm_broadcast_is_dropped_only_where_no_rank_can_receive_one():
    """Under Ray Train the fit runs in a thread, where Lightning cannot install its SIGTERM handler, so its
    per-step broadcast of rank 0's flag is a round trip that always says 0 (faults.py). Real 2-rank gloo fits
    under torchrun: dropped when every rank fits in a thread, kept in the main thread, kept when ranks differ."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ASSETS / "sigterm_ranks.py")], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(text for text in result.stdout.splitlines() if text.startswith("RESULT "))
    fits = json.loads(line.removeprefix("RESULT "))
    assert fits["threads"] == {"dropped": True, "real_broadcasts": 0, "steps": 6}
    # Lightning's own broadcast ran before every step where it was kept (its name pins the private hook).
    assert fits["main"] == {"dropped": False, "real_broadcasts": 6, "steps": 6}
    assert fits["mixed"] == {"dropped": False, "real_broadcasts": 6, "steps": 6}
