"""python -m sim: the offload-sim command."""

import sys

from sim.cli import main

sys.exit(main())
