"""python -m vae.launch [accelerate launch options] vae/train.py ...: a supervised launch (vae/launch/supervisor.py)."""

import sys

from vae.launch.supervisor import supervise

raise SystemExit(supervise(sys.argv[1:]))
