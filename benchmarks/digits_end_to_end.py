"""Former entry point of the digits end-to-end comparison, kept as a thin wrapper: it is cases `digits` and `digits_warm` of run.py.

Run: .venv/bin/python benchmarks/digits_end_to_end.py [--repeats N] [--epochs E]
which runs `benchmarks/run.py --cases digits,digits_warm` (plain Lightning DDP against orch cold, then against
orch warm; see run.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    args, rest = parser.parse_known_args()  # anything else goes to run.py as it is
    run = Path(__file__).with_name("run.py")
    os.execv(sys.executable, [sys.executable, str(run), "--cases", "digits,digits_warm", "--repeats", str(args.repeats),
                              "--epochs", str(args.epochs), *rest])


if __name__ == "__main__":
    main()
