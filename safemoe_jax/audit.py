"""`python -m safemoe_jax.audit` = `safemoe audit` (safemoe_jax/cli/audit.py)."""

import sys

from safemoe_jax.cli.audit import main

if __name__ == "__main__":
  sys.exit(main())
