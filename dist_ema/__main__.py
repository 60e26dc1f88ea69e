"""``python -m dist_ema`` (and ``torchrun -m dist_ema``) runs the ``dist-ema`` command."""

import sys

from dist_ema.cli import main

sys.exit(main())
