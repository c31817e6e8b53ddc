"""The progress board in Ray's key-value store: concurrent writers in other processes lose nothing, and a closed
board leaves nothing behind in a cluster that lives on."""

from __future__ import annotations


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
