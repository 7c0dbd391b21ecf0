"""ℓ∞ projected gradient attacks on batched images in [0, 1].

**Random starts are drawn where the images are.** On the CPU the start is drawn from the caller's
CPU generator, as it always was (so a seed gives the same CPU results as before). On a GPU,
drawing ``B×C×H×W`` uniforms on the host and copying them over cost ~0.4–0.9 s of CPU per
128×3×224×224 batch and stalled the device every adversarial step; there the start is drawn on the
device, from a device generator seeded with one 63-bit draw of the caller's generator. A seed thus
still fixes every start (and the CPU generator advances by one draw per batch instead of one per
pixel), but a GPU run's starts differ from a CPU run's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def device_generator(device: torch.device, generator: torch.Generator | None = None) -> torch.Generator:
    """A generator on ``device`` seeded by one draw of ``generator`` (the global CPU RNG when None)."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """δ uniform in [−eps, eps] per pixel, shaped like ``x``, on ``x``'s device (see the module notes)."""
    if x.device.type == "cpu" or (generator is not None and generator.device == x.device):
        noise = torch.rand(x.shape, generator=generator, device=x.device)
    else:
        noise = torch.rand(x.shape, generator=device_generator(x.device, generator), device=x.device)
    return noise.mul_(2).sub_(1).mul_(eps)  # in place: the values of (noise * 2 - 1) * eps


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    *,
    loss_fn: LossFn | None = None,
    random_start: bool = True,
    targeted: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``x + δ`` with ‖δ‖∞ ≤ eps that raises ``loss_fn(model(x+δ), y)`` (lowers it if targeted).

    ``loss_fn`` is summed over the batch (default: cross entropy), so each sample's sign
    gradient is its own. The model's train/eval mode is left as the caller set it. The random
    start is drawn on ``x``'s device from ``generator`` (see the module notes).
    """
    loss_fn = loss_fn or (lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum"))
    x = x.detach()
    delta = _random_start(x, eps, generator) if random_start else torch.zeros_like(x)
    delta = delta.add_(x).clamp_(0, 1).sub_(x)  # in place: the values of (x + δ).clamp(0, 1) − x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        direction = -grad.sign() if targeted else grad.sign()
        delta = (delta.detach() + step * direction).clamp_(-eps, eps)
        delta = delta.add_(x).clamp_(0, 1).sub_(x)
    return (x + delta).detach()


_random_start = random_start  # ``pgd``'s ``random_start`` flag shadows the function's name inside it


def ifgsm(model, x, y, eps: float, steps: int, step: float | None = None, *, loss_fn: LossFn | None = None):
    """Iterative FGSM: PGD from the clean image, step ``eps/steps`` unless given."""
    return pgd(model, x, y, eps, step if step is not None else eps / steps, steps, loss_fn=loss_fn, random_start=False)
