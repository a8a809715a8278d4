"""Inference: batched generation with the KV cache and live routing."""
