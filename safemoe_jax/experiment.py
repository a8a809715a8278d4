"""`python -m safemoe_jax.experiment` = `safemoe experiment` (safemoe_jax/cli/experiment.py)."""

import sys

from safemoe_jax.cli.experiment import main

if __name__ == "__main__":
  sys.exit(main())
