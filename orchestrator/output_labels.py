"""Every line a job prints, labelled by node and rank: workers prefix their own output, `orch logs` the rest.

Ray forwards a worker's output to the driver as "(RayTrainWorker pid=…, ip=…) text", which names neither
the rank nor the node (two nodes on one machine share an IP). Workers therefore write "[rank R @ NODE] "
in front of each of their lines; the client labels the driver's own lines and other actors' lines.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from typing import TextIO

RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?P<actor>[^\s()]+) pid=(?P<pid>\d+)(?:, ip=(?P<ip>[^)]+))?\)"
                        r"(?:\x1b\[[0-9;]*m)* ?(?P<text>.*)$")
WORKER_LABEL = re.compile(r"^\[rank \d+ @ [^\]]+\] ")


class LabelledStream(io.TextIOBase):
    """Writes `label` at the start of every line; everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO, label: str):
        self._stream = stream
        self._label = label
        self._line_start = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        pieces = []
        for piece in text.splitlines(keepends=True):
            if self._line_start:
                pieces.append(self._label)
            pieces.append(piece)
            self._line_start = piece.endswith(("\n", "\r"))
        self._stream.write("".join(pieces))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


def label_worker_output(rank: int, node: str) -> None:
    """Prefix this worker's stdout, stderr and the logging handlers already bound to them."""
    label = f"[rank {rank} @ {node}] "
    replacements = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, LabelledStream):
            continue
        labelled = LabelledStream(stream, label)
        replacements[id(stream)] = labelled
        setattr(sys, name, labelled)
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and id(stream) in replacements:
                handler.setStream(replacements[id(stream)])


def node_name() -> str:
    """The Ray node's name (`ray start --node-name`, else its IP), which tells apart nodes sharing a machine."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node.get("NodeName") or node.get("NodeManagerAddress") or node_id[:8]
    return node_id[:8]


def relabel(line: str, driver_node: str, names_by_ip: dict[str, str]) -> str:
    """One line of a job's log, labelled: worker lines keep their own label, the rest get the driver's or actor's."""
    match = RAY_PREFIX.match(line)
    if match is None:
        return f"[driver @ {driver_node}] {line}"
    text = match["text"]
    if WORKER_LABEL.match(text):
        return text
    # Ray leaves the ip out for processes on the driver's own node.
    where = names_by_ip.get(match["ip"], match["ip"]) if match["ip"] else driver_node
    return f"[{match['actor']} @ {where}] {text}"
