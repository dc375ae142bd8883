"""Architecture-design tools: the search space (space), per-operator latency lookup tables (latency), aging
evolution over the space (evolution), the depth-width fit (scaling) and candidate training with the real trainer
(candidates). Commands and file formats: docs/design_tools.md."""
