"""`python -m safemoe_jax.evaluate` = `safemoe evaluate` (safemoe_jax/cli/evaluate.py)."""

import sys

from safemoe_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
