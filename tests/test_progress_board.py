"""The progress board in Ray's key-value store: concurrent writers in other processes lose nothing, and a closed
board leaves nothing behind in a cluster that lives on."""

from __future__ import annotations

import pytest


def test_events_from_concurrent_processes_are_all_kept_in_order(ray_address):
    import ray

    from orchestrator.progress import ProgressBoard

    board = ProgressBoard()
    board.update({"attempt_base": 2, "phase": "starting", "validation": {"epoch": 0, "metrics": {"val/acc": 0.5}}})
    board.update({"phase": "training"})

    @ray.remote(num_cpus=0)
    def write(board, writer: str, count: int) -> None:
        for index in range(count):
            board.append("attempts", {"writer": writer, "index": index})
        board.update({f"done_{writer}": True})

    ray.get([write.remote(board, writer, 30) for writer in ("a", "b")])
    state = board.snapshot()
    assert state["attempt_base"] == 2 and state["phase"] == "training"  # the latest value of a key wins
    assert state["validations"] == [{"epoch": 0, "metrics": {"val/acc": 0.5}}]
    assert state["done_a"] and state["done_b"]
    events = state["attempts"]
    assert len(events) == 60
    for writer in ("a", "b"):  # each writer's events in the order it wrote them
        assert [event["index"] for event in events if event["writer"] == writer] == list(range(30))
    assert board.items("attempts") == events
    assert board.items("failures") == [] and board.get("stop_requested", False) is False

    # What the training loop posts is written by a background thread, in order, by the time flush() returns.
    for step in range(5):
        board.post({"step": step})
    board.post({"validation": {"epoch": 1, "metrics": {}}})
    board.flush()
    assert board.get("step") == 4 and board.get_later("phase").result(timeout=10) == "training"
    assert board.items("validations")[-1] == {"epoch": 1, "metrics": {}}

    other = ProgressBoard()  # another job's board on the same cluster sees none of it
    other.update({"phase": "starting"})
    assert other.snapshot() == {"phase": "starting"}

    board.close()
    assert board.snapshot() == {} and board.get("phase") is None
    assert other.snapshot() == {"phase": "starting"}
    other.close()


def test_a_killed_drivers_board_is_swept_by_the_next_board(ray_address, tmp_path):
    """A driver SIGKILLed mid-job never closes its board; the next board on the cluster deletes it once Ray lists
    that driver's job as finished, and leaves a live job's board alone."""
    import os
    import subprocess
    import sys
    import time

    from orchestrator.progress import ProgressBoard, sweep_boards_of_finished_jobs

    live = ProgressBoard(sweep=False)
    live.update({"phase": "training"})
    script = ("import os, signal\n"
              "from orchestrator.cluster import connect\n"
              f"connect({ray_address!r}, verbose=False)  # joins as `orch submit --cluster` does\n"
              "from orchestrator.progress import ProgressBoard\n"
              "import threading\n"
              "board = ProgressBoard()  # sweeps by itself, from a daemon thread (below)\n"
              "board.update({'phase': 'training'}); board.append('attempts', {'attempt': 1})\n"
              "print('non-daemon threads:', [t.name for t in threading.enumerate()\n"
              "                              if not t.daemon and t is not threading.main_thread()], flush=True)\n"
              "print(board.prefix, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    log = tmp_path / "driver.log"  # a file, not a pipe: what Ray started for the driver may hold a pipe open
    with open(log, "w") as out:
        killed = subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, timeout=120)
    lines = [line for line in log.read_text().splitlines() if line.startswith("board/")]
    assert lines and killed.returncode == -9, log.read_text()[-2000:]
    prefix = lines[-1]
    # `orch submit` joins non-daemon threads at exit (cli._exit_now): a sweep on the board's writer pool, whose
    # thread is not a daemon, held every submit's exit for 30 s.
    assert "non-daemon threads: []" in log.read_text()
    orphan = ProgressBoard(sweep=False)
    orphan.prefix = prefix  # the killed driver's board, as a reader sees it
    assert orphan.snapshot() == {"phase": "training", "attempts": [{"attempt": 1}]}

    deadline = time.time() + 60  # the GCS marks the job finished once the raylet sees its driver gone
    swept = 0
    while not swept and time.time() < deadline:
        swept = sweep_boards_of_finished_jobs()
        time.sleep(0.5)
    assert swept >= 2 and orphan.snapshot() == {}  # more where another test's killed driver left a board
    assert live.snapshot() == {"phase": "training"}  # this test's own job is alive
    live.close()


def test_the_view_keeps_a_stop_on_screen_and_prints_each_epoch_once():
    # A stop's status stays up while the workers still train (polls keep coming), and an epoch line is printed
    # once even when a Ctrl-C lands inside print() and the same board state is shown again.
    import io

    from rich.console import Console

    from orchestrator.progress import ProgressView

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    validation = {"epoch": 0, "step": 23, "metrics": {"val/acc": 0.5}}
    with ProgressView(console, "job", 2) as view:
        view.update({"phase": "training", "step": 1, "total_steps": 10})
        assert view.status == "training"
        view.set_status("stopping: writing a checkpoint")
        view.update({"phase": "training", "step": 2, "total_steps": 10, "validations": [validation]})
        assert view.status == "stopping: writing a checkpoint"

        def interrupted_print(*args, **kwargs):  # the Ctrl-C arrives just as the line is written
            real_print(*args, **kwargs)
            raise KeyboardInterrupt

        second = {"epoch": 1, "step": 46, "metrics": {"val/acc": 0.75}}
        console.print, real_print = interrupted_print, console.print
        with pytest.raises(KeyboardInterrupt):
            view.update({"phase": "training", "step": 3, "validations": [validation, second]})
        console.print = real_print
        view.update({"phase": "training", "step": 4, "validations": [validation, second]})
    view.close()  # a second close does nothing
    for line in ("epoch 1  step 23", "epoch 2  step 46"):
        assert out.getvalue().count(line) == 1, out.getvalue()
