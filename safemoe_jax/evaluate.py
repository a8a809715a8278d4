"""`python -m safemoe_jax.evaluate`: see safemoe_jax.evaluation.run."""

import sys

from safemoe_jax.evaluation.run import main

if __name__ == "__main__":
  sys.exit(main())
