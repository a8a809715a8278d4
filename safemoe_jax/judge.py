"""`python -m safemoe_jax.judge`: see safemoe_jax.judging.learned."""

import sys

from safemoe_jax.judging.learned import main

if __name__ == "__main__":
  sys.exit(main())
