"""`python -m safemoe_jax.report`: see safemoe_jax.evaluation.report."""

import sys

from safemoe_jax.evaluation.report import main

if __name__ == "__main__":
  sys.exit(main())
