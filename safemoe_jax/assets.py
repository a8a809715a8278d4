"""`python -m safemoe_jax.assets` = `safemoe assets` (safemoe_jax/cli/assets.py)."""

import sys

from safemoe_jax.cli.assets import main

if __name__ == "__main__":
  sys.exit(main())
