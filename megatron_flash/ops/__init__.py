"""Sequence-mixing kernels with selectable backends, each beside its plain PyTorch reference."""
