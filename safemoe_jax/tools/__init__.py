"""Tools around the method: benchmarks, TPU ahead-of-time checks, PEFT / merged export and import."""
