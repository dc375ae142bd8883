"""Experiments that reproduce findings of the Nemotron-Flash paper at small scale (see docs/experiments.md)."""
