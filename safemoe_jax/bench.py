"""`python -m safemoe_jax.bench` = `safemoe bench` (safemoe_jax/cli/bench.py)."""

import sys

from safemoe_jax.cli.bench import main

if __name__ == "__main__":
  sys.exit(main())
