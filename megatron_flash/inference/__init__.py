"""Inference drivers for exported (Hugging Face layout) Nemotron-Flash models: :mod:`.graph_decode`."""
