"""orchestrator: submit Lightning jobs to Ray Train from one YAML spec; every run recorded in MLflow."""

import time as _time

__version__ = "0.1.0"
# When this package was first imported (wall clock, and the CPU this process had used by then): the start of
# `orch`'s own work, which cli.py weighs against the process's creation time.
FIRST_IMPORT = (_time.time(), _time.process_time())
