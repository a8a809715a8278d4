"""PEFT adapters and merged checkpoints, to and from SafeMoE runs."""
