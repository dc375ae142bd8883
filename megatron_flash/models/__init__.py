"""The Nemotron-Flash model: specs per layer type, the hybrid stack, and the language model around it."""
