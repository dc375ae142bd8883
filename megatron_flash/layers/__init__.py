"""Megatron modules for the hybrid layers. Each mixer is built from a ModuleSpec (see models/specs.py)."""
