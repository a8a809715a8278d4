"""`python -m safemoe_jax.assets`: see safemoe_jax.io.assets."""

from safemoe_jax.io.assets import main

if __name__ == "__main__":
  main()
