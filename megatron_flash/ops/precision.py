"""The compute dtype the ops share: fp32 for 16-bit inputs, the input's own for fp32 and fp64 (so that fp64 tests
check the math exactly)."""

from __future__ import annotations

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` widened to fp32 if it is a 16-bit float, else ``t`` itself."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
