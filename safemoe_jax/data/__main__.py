import sys

from safemoe_jax.data.sources import main

sys.exit(main())
