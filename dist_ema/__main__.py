"""``python -m dist_ema`` (and ``torchrun -m dist_ema``) runs the ``dist-ema`` command."""

import os
import sys

from dist_ema.cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # gloo's threads can abort at interpreter exit after all work finished: leave directly
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
