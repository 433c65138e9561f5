"""Model FLOPs utilisation on CUDA: the FLOPs of one training step, counted once (the first step)
with torch's FlopCounterMode, times the steps per second, over the GPU's peak dense throughput."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

# Dense bf16/fp16 tensor-core peaks (FLOP/s), from the vendors' data sheets, by a name fragment
# torch.cuda.get_device_name reports. Unknown cards get no MFU rather than a made-up one.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L40": 181e12, "L4": 121e12, "A6000": 155e12, "A10": 125e12, "4090": 165e12, "4080": 97e12,
              "3090": 71e12, "3080": 60e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class StepFlops:
    def __init__(self, device: torch.device, precision: str):
        self.peak = peak_flops(device, precision)
        self.flops: int | None = None

    @contextmanager
    def counting(self, ready: bool = True):
        """Count the FLOPs of the step inside the block, the first time it is `ready` only (and only where an MFU
        exists). Compiled code runs eagerly while counted: a step that compiles is not the one to count."""
        if self.peak is None or self.flops is not None or not ready:
            with nullcontext():
                yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops = counter.get_total_flops()

    def mfu(self, it_s: float) -> dict:
        if self.peak is None or not self.flops:
            return {}
        return {"mfu": round(self.flops * it_s / self.peak, 4), "step_flops": self.flops}
