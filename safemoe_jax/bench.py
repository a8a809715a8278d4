"""`python -m safemoe_jax.bench`: see safemoe_jax.tools.bench."""

import sys

from safemoe_jax.tools.bench import main

if __name__ == "__main__":
  sys.exit(main())
