"""`python -m safemoe_jax.report` = `safemoe report` (safemoe_jax/cli/report.py)."""

import sys

from safemoe_jax.cli.report import main

if __name__ == "__main__":
  sys.exit(main())
