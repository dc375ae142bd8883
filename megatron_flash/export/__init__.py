"""Checkpoint conversion between megatron_flash (dist_checkpointing) and NVIDIA's released Hugging Face layout.

:mod:`.hf_mapping` holds the name/shape table (both directions), :mod:`.convert` the converters and their command
lines (tools/convert_to_hf.py, tools/convert_from_hf.py). See docs/export.md.
"""
