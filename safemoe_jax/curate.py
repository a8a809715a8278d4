"""`python -m safemoe_jax.curate` = `safemoe curate` (safemoe_jax/cli/curate.py)."""

import sys

from safemoe_jax.cli.curate import main

if __name__ == "__main__":
  sys.exit(main())
