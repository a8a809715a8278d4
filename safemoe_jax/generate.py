"""`python -m safemoe_jax.generate`: see safemoe_jax.infer.generate."""

import sys

from safemoe_jax.infer.generate import main

if __name__ == "__main__":
  sys.exit(main())
