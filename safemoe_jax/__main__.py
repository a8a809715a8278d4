"""`python -m safemoe_jax <command> ...` = `safemoe <command> ...`."""

import sys

from safemoe_jax.cli import main

sys.exit(main())
