"""`python -m safemoe_jax.judge` = `safemoe judge` (safemoe_jax/cli/judge.py)."""

import sys

from safemoe_jax.cli.judge import main

if __name__ == "__main__":
  sys.exit(main())
