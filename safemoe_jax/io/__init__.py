"""Reading and writing models: weights (safetensors, GGUF), tokenizers and chat templates, pinned
assets, the Hugging Face Hub, and the one way to load a base model."""
