"""`python -m safemoe_jax.data` = `safemoe data` (safemoe_jax/cli/data.py)."""

import sys

from safemoe_jax.cli.data import main

sys.exit(main())
