"""`python -m safemoe_jax.export` = `safemoe export` (safemoe_jax/cli/export.py)."""

import sys

from safemoe_jax.cli.export import main

if __name__ == "__main__":
  sys.exit(main())
