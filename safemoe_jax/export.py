"""`python -m safemoe_jax.export`: see safemoe_jax.tools.export.peft."""

import sys

from safemoe_jax.tools.export.peft import main

if __name__ == "__main__":
  sys.exit(main())
