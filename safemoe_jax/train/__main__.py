import sys

from safemoe_jax.train.loop import main

sys.exit(main())
