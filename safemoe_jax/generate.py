"""`python -m safemoe_jax.generate` = `safemoe generate` (safemoe_jax/cli/generate.py)."""

import sys

from safemoe_jax.cli.generate import main

if __name__ == "__main__":
  sys.exit(main())
