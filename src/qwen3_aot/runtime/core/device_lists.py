"""Small host lists as device tensors, without waiting for the device."""

from __future__ import annotations

import torch


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor on `device` without waiting for it: torch.tensor(..., device="cuda")
    copies from pageable memory and synchronises the stream, i.e. waits for every queued kernel."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
