"""`python -m safemoe_jax.audit`: see safemoe_jax.judging.audit."""

import sys

from safemoe_jax.judging.audit import main

if __name__ == "__main__":
  sys.exit(main())
