"""The fused backward pass: each weight is stepped by its own optimizer inside its
post-accumulate-grad hook, and its gradient freed at once, so the gradients of the whole model
never exist together (for SD 1.5's UNet that is 1.7 GB in bf16 never held).

Two consequences the loop relies on:
- gradient clipping cannot see a global norm before the first step, so it applies per weight
  tensor (as kohya's fused pass does): `max_grad_norm` bounds each tensor's gradient norm;
- with bf16 weights, the optimizer steps an fp32 copy of one tensor at a time and the result is
  rounded stochastically back to bf16, so updates smaller than bf16's resolution are not lost
  on average (plain rounding would drop every update below ~0.4% of the weight).
"""

from __future__ import annotations

import torch

from .method import ParamGroups
from .optim import make_optimizer


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 to bf16 up or down with probability proportional to the distance: unbiased."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # drop the low 16 bits


class FusedOptimizer(torch.optim.Optimizer):
    """Looks like one optimizer to the LR scheduler and to checkpoints; steps in backward hooks."""

    def __init__(self, train, groups: ParamGroups, seed: int = 0):
        # Deliberately no super().__init__: the real work is done by one optimizer per weight.
        self.max_grad_norm = train.max_grad_norm
        self.bf16_weights = train.weights_dtype == "bf16"
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self.shadows: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        for group in groups:
            for p in group["params"]:
                target = p
                if self.bf16_weights:  # an fp32 stand-in whose storage exists only while it steps
                    target = self.shadows[p] = torch.nn.Parameter(torch.empty(0, device=p.device))
                self.optimizers[p] = make_optimizer(train, [{"params": [target], "lr": group["lr"]}])
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.defaults, self.state = {}, {}
        self.armed = True  # False during the micro-steps of gradient accumulation but the last
        self.generator = None
        self.seed = seed
        self.hooks = [p.register_post_accumulate_grad_hook(self._step_param) for p in self.optimizers]

    def begin_step(self, step: int, last_micro: bool) -> None:
        self.armed = last_micro
        device = next(iter(self.optimizers)).device
        self.generator = torch.Generator(device).manual_seed(self.seed * 7_919 + step)

    @torch.no_grad()
    def _step_param(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        if self.bf16_weights:
            shadow = self.shadows[p]
            shadow.data, shadow.grad = p.data.float(), p.grad.float()
            self.optimizers[p].step()
            p.data.copy_(stochastic_round_to_bf16(shadow.data, self.generator))
            shadow.data, shadow.grad = torch.empty(0, device=p.device), None
        else:
            self.optimizers[p].step()
        p.grad = None

    @property
    def schedulable(self):
        """What the LR schedule steers: this optimizer, whose param_groups are the per-weight ones."""
        return self

    def clip(self) -> None:  # each weight's gradient was clipped in its hook
        pass

    def step(self, closure=None):  # the hooks already stepped every weight
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # the hooks already freed every gradient
        return None

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state: dict) -> None:
        for opt, opt_state in zip(self.optimizers.values(), state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
