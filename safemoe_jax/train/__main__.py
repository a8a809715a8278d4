"""`python -m safemoe_jax.train` = `safemoe train` (safemoe_jax/cli/train.py)."""

import sys

from safemoe_jax.cli.train import main

sys.exit(main())
