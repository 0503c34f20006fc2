"""Entry point of one device process of an emulation (``run_emulation(device_processes=n)``).

    python -m sim.device_process FD

``FD`` is this process's end of a pipe its parent opened; everything else comes over it.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection

from sim.emulate import device_process


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m sim.device_process FD (started by sim.emulate, not by hand)",
              file=sys.stderr)
        return 2
    with Connection(int(argv[0])) as conn:
        device_process(conn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
