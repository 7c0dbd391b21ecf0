"""Per-sample difficulty scores of the hard-sample clean-label attack: loss value, gradient norm and
forgetting events, each computed for every training sample so a poison stage can take the top-k
of the target class.

Gradient norms are the ℓ2 norm of the gradient of one sample's cross-entropy w.r.t. all trainable
parameters, with the model in eval mode. Done naively that is one backward per sample
(:func:`per_sample_grad_norms_loop`, the reference). :func:`per_sample_grad_norms` gets the same
numbers from one forward and one backward per batch: in eval mode BatchNorm uses its running
statistics, so samples do not interact and the gradient of the *summed* loss w.r.t. a layer's
output, restricted to sample i, is sample i's own output gradient. Each layer's per-sample weight
gradient is then a product of that output gradient with the layer's stored input, and only its
squared norm is needed, never the gradient itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .trainer import images_to_tensor, to_float

SCORE_COLUMNS = ("index", "label", "loss", "gradnorm", "forgetting")


# --------------------------------------------------------------------------------------------
# Forgetting events
# --------------------------------------------------------------------------------------------

def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Number of forgetting events per sample from an (epochs, N) correctness matrix.

    An event is a sample classified correctly at epoch e−1 and wrongly at epoch e. A sample never
    classified correctly is the hardest possible and gets the maximum count, the number of epochs.
    """
    correct = np.asarray(correct)
    if correct.ndim != 2:
        raise ValueError(f"correct: expected an (epochs, N) matrix, got shape {correct.shape}")
    correct = correct.astype(bool)
    epochs = correct.shape[0]
    events = (correct[:-1] & ~correct[1:]).sum(axis=0).astype(np.int64)
    never_learned = ~correct.any(axis=0)
    events[never_learned] = epochs
    return events


# --------------------------------------------------------------------------------------------
# Loss values
# --------------------------------------------------------------------------------------------

def _batches(images: np.ndarray, labels: np.ndarray, device, batch_size: int):
    """Float NCHW images in [0, 1] and long labels on ``device``, ``batch_size`` at a time."""
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        y = torch.as_tensor(np.asarray(labels[start:start + batch_size]), dtype=torch.long, device=device)
        yield x, y


@torch.no_grad()
def per_sample_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray, device="cpu",
                    batch_size: int = 512, loss=None) -> np.ndarray:
    """Unreduced loss of every sample of uint8 NHWC ``images``, model in eval mode: ``loss(logits,
    labels)`` per sample, by default the cross entropy."""
    model.eval()
    loss = loss or (lambda logits, y: F.cross_entropy(logits, y, reduction="none"))
    out = [loss(model(x).float(), y).cpu() for x, y in _batches(images, labels, device, batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Gradient norms: reference loop
# --------------------------------------------------------------------------------------------

def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def per_sample_grad_norms_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: one forward and backward per sample, model in eval mode. Returns (N,)."""
    model.eval()
    params = _trainable(model)
    norms = torch.empty(len(x), device=x.device)
    with torch.enable_grad():
        for i in range(len(x)):
            loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norms[i] = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))
    return norms


# --------------------------------------------------------------------------------------------
# Gradient norms: batched, from layer inputs and output gradients
# --------------------------------------------------------------------------------------------

def gram_is_cheaper(p: int, q: int, positions: int) -> bool:
    """Whether the Gram form beats forming the (P, Q) per-sample gradient, by multiply-add count.

    Forming it costs P·Q·L per sample; the Gram form Σ_{l,l'} (g_l·g_l')(a_l·a_l') costs
    L²·(P+Q). The Gram form wins where L is small against the channel counts (late conv stages,
    linear layers with L = 1); measured on CPU the crossover sits where the two counts are equal.
    """
    return positions * positions * (p + q) < p * q * positions


def gram_sq_norm(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖Σ_l g_l a_lᵀ‖²_F = Σ_{l,l'} (g_l·g_l')(a_l·a_l') for (N, P, L) and (N, Q, L)."""
    return (torch.bmm(grad.transpose(1, 2), grad) * torch.bmm(act.transpose(1, 2), act)).sum(dim=(1, 2))


def direct_sq_norm(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖Σ_l g_l a_lᵀ‖²_F by forming the (N, P, Q) gradients with one batched matmul."""
    return torch.bmm(grad, act.transpose(1, 2)).pow(2).sum(dim=(1, 2))


def outer_product_sum_sq_norm(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖Σ_l g_l a_lᵀ‖²_F for ``grad`` (N, P, L) and ``act`` (N, Q, L), the cheaper way.

    This is the weight gradient of a layer applied at L positions (linear layers: the extra input
    dims; L = 1 for plain (N, F) inputs).
    """
    if gram_is_cheaper(grad.shape[1], act.shape[1], grad.shape[2]):
        return gram_sq_norm(grad, act)
    return direct_sq_norm(grad, act)


def _bias_sq_norm(grad_output: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of a bias gradient: the output gradient summed over positions, (N, C, L)."""
    return grad_output.sum(dim=2).pow(2).sum(dim=1)


def _linear_sq_norm(module: nn.Linear, inputs: torch.Tensor, grad_output: torch.Tensor, _unused) -> torch.Tensor:
    n = inputs.shape[0]
    # (N, ..., F) → (N, F, L): every leading position after the batch dim shares the weight.
    act = inputs.reshape(n, -1, inputs.shape[-1]).transpose(1, 2)
    grad = grad_output.reshape(n, -1, grad_output.shape[-1]).transpose(1, 2)
    total = torch.zeros(n, device=inputs.device, dtype=inputs.dtype)
    if module.weight.requires_grad:
        total = total + outer_product_sum_sq_norm(grad, act)
    if module.bias is not None and module.bias.requires_grad:
        total = total + _bias_sq_norm(grad)
    return total


def _conv2d_prepare(module: nn.Conv2d, name: str):
    """Refuse convolutions the unfold/grouped-conv formulas do not cover; return numeric padding."""
    if module.groups != 1:
        raise ValueError(f"{name}: per-sample gradient norms support Conv2d with groups=1 only (got {module.groups})")
    if module.padding_mode != "zeros":
        raise ValueError(f"{name}: per-sample gradient norms support padding_mode='zeros' only "
                         f"(got '{module.padding_mode}')")
    if isinstance(module.padding, str):
        if module.padding != "valid":
            raise ValueError(f"{name}: per-sample gradient norms need numeric padding (got '{module.padding}')")
        return 0
    return module.padding


def _conv2d_weight_sq_norm(module: nn.Conv2d, inputs: torch.Tensor, grad_output: torch.Tensor,
                           padding) -> torch.Tensor:
    """Per-sample squared norm of a conv weight gradient, by the cheaper of two exact forms.

    Per sample the weight gradient is G_i (Cout, L) @ U_iᵀ with U_i the unfolded input
    (Cin·kh·kw, L). Where L is large (early, high-resolution layers) the per-sample gradients are
    formed directly as the weight gradient of one grouped convolution with the batch folded into
    the channels (groups = N): the same multiply-adds as G_i U_iᵀ but without materialising the
    unfolded input, which is kh·kw times the activation and made unfold + bmm several times slower
    on CPU. Where L is small the Gram form on the unfolded input is cheaper still.
    """
    n, cin, height, width = inputs.shape
    cout = grad_output.shape[1]
    kh, kw = module.kernel_size
    grad = grad_output.reshape(n, cout, -1)
    if gram_is_cheaper(cout, cin * kh * kw, grad.shape[2]):
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding,
                           stride=module.stride)
        return gram_sq_norm(grad, patches)
    per_sample = torch.nn.grad.conv2d_weight(
        inputs.reshape(1, n * cin, height, width), (n * cout, cin, kh, kw),
        grad_output.reshape(1, n * cout, *grad_output.shape[2:]),
        stride=module.stride, padding=padding, dilation=module.dilation, groups=n)
    return per_sample.reshape(n, -1).pow(2).sum(dim=1)


def _conv2d_sq_norm(module: nn.Conv2d, inputs: torch.Tensor, grad_output: torch.Tensor,
                    padding) -> torch.Tensor:
    n = inputs.shape[0]
    total = torch.zeros(n, device=inputs.device, dtype=inputs.dtype)
    if module.weight.requires_grad:
        total = total + _conv2d_weight_sq_norm(module, inputs, grad_output, padding)
    if module.bias is not None and module.bias.requires_grad:
        total = total + _bias_sq_norm(grad_output.reshape(n, grad_output.shape[1], -1))
    return total


def _batchnorm2d_prepare(module: nn.BatchNorm2d, name: str):
    if module.training or module.running_mean is None:
        raise ValueError(f"{name}: per-sample gradient norms need BatchNorm2d in eval mode with running "
                         f"statistics (batch statistics would couple the samples)")
    return None


def _batchnorm2d_sq_norm(module: nn.BatchNorm2d, inputs: torch.Tensor, grad_output: torch.Tensor,
                         _unused) -> torch.Tensor:
    n, channels = inputs.shape[:2]
    total = torch.zeros(n, device=inputs.device, dtype=inputs.dtype)
    grad = grad_output.reshape(n, channels, -1)
    if module.weight is not None and module.weight.requires_grad:
        # Σ_l g·x̂ with x̂ = (x − μ)/σ: the 1/σ is per channel, so apply it after the spatial sum
        # (one full-size product fewer); centre before multiplying to keep float32 precision.
        centred = inputs.reshape(n, channels, -1) - module.running_mean.view(1, -1, 1)
        weight_grad = (grad * centred).sum(dim=2) * torch.rsqrt(module.running_var + module.eps)
        total = total + weight_grad.pow(2).sum(dim=1)
    if module.bias is not None and module.bias.requires_grad:
        total = total + _bias_sq_norm(grad)
    return total


@dataclass(frozen=True)
class _LayerRule:
    """How one module type turns (input, output gradient) into per-sample squared gradient norms.

    ``prepare(module, name)`` validates the module once (raising a clear error) and returns data
    the ``sq_norm(module, inputs, grad_output, prepared)`` step needs.
    """
    prepare: Callable
    sq_norm: Callable


def _linear_prepare(module: nn.Linear, name: str):
    return None  # every nn.Linear is supported; nothing to precompute


# Exact types: a subclass may change forward (e.g. reparametrised weights), which these formulas would miss.
LAYER_RULES: dict[type, _LayerRule] = {
    nn.Linear: _LayerRule(_linear_prepare, _linear_sq_norm),
    nn.Conv2d: _LayerRule(_conv2d_prepare, _conv2d_sq_norm),
    nn.BatchNorm2d: _LayerRule(_batchnorm2d_prepare, _batchnorm2d_sq_norm),
}


@dataclass
class _LayerTap:
    """Hooks on one parameterised module: keep its input in forward, turn it into norms in backward."""
    name: str
    module: nn.Module
    rule: _LayerRule
    prepared: object
    accumulate: Callable[[torch.Tensor], None]
    calls: int = 0
    inputs: torch.Tensor | None = None
    input_version: int = 0
    handles: list = field(default_factory=list)

    def forward_hook(self, module, args, output):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(f"{self.name}: a parameterised module runs more than once per forward; "
                               f"per-sample gradient norms need each to run exactly once")
        self.inputs = args[0].detach()
        self.input_version = args[0]._version
        if output.requires_grad:
            # A tensor hook registered now fires with the gradient w.r.t. this value even when a
            # later in-place op (ReLU(inplace=True), a residual `+=`) overwrites the tensor.
            output.register_hook(self.gradient_hook)

    def gradient_hook(self, grad_output: torch.Tensor):
        if self.inputs._version != self.input_version:
            raise RuntimeError(f"{self.name}: its input was modified in place after the layer ran, "
                               f"so its per-sample weight gradient cannot be recovered")
        self.accumulate(self.rule.sq_norm(self.module, self.inputs, grad_output.detach(), self.prepared))
        self.inputs = None  # free the activation as soon as its layer is done

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _parameterised_modules(model: nn.Module):
    """(name, module) for every module that directly owns a trainable parameter."""
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            yield name or type(module).__name__, module


def _attach_taps(model: nn.Module, accumulate) -> list[_LayerTap]:
    taps = []
    try:
        for name, module in _parameterised_modules(model):
            rule = LAYER_RULES.get(type(module))
            if rule is None:
                raise ValueError(f"{name}: per-sample gradient norms do not support trainable "
                                 f"{type(module).__name__} (supported: "
                                 f"{', '.join(t.__name__ for t in LAYER_RULES)})")
            tap = _LayerTap(name, module, rule, rule.prepare(module, name), accumulate)
            tap.handles.append(module.register_forward_hook(tap.forward_hook))
            taps.append(tap)
    except Exception:
        for tap in taps:
            tap.remove()
        raise
    return taps


def per_sample_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each sample's cross-entropy gradient w.r.t. all trainable parameters, batched.

    ``x`` is float (N, C, H, W) in [0, 1], ``y`` long (N,). The model is put in eval mode. One
    forward and one backward for the whole batch; equals :func:`per_sample_grad_norms_loop`.
    """
    model.eval()
    total = torch.zeros(len(x), device=x.device, dtype=x.dtype)

    def accumulate(sq_norm: torch.Tensor):
        total.add_(sq_norm)

    taps = _attach_taps(model, accumulate)
    try:
        with torch.enable_grad():
            # Differentiating w.r.t. the input (not the parameters) runs every layer's backward
            # for its output gradient but skips autograd's own batch-summed weight gradients,
            # which this function replaces with per-sample ones.
            x_leaf = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x_leaf), y, reduction="sum")
            missing = [tap.name for tap in taps if tap.calls != 1]
            if missing:
                raise RuntimeError(f"{', '.join(missing)}: trainable module(s) not called in forward; "
                                   f"per-sample gradient norms need each to run exactly once")
            torch.autograd.grad(loss, x_leaf)
        unreached = [tap.name for tap in taps if tap.inputs is not None]
        if unreached:
            raise RuntimeError(f"{', '.join(unreached)}: output does not depend on the input; "
                               f"its per-sample gradient was not computed")
    finally:
        for tap in taps:
            tap.remove()
    return total.sqrt()


def grad_norms(model: nn.Module, images: np.ndarray, labels: np.ndarray, device="cpu",
               batch_size: int = 128) -> np.ndarray:
    """Per-sample gradient norms of uint8 NHWC ``images`` with labels, in batches. Returns (N,)."""
    out = []
    batches = _batches(images, labels, device, batch_size)
    total = (len(images) + batch_size - 1) // batch_size
    for x, y in tqdm(batches, total=total, desc="gradnorm", unit="batch", leave=False, dynamic_ncols=True):
        out.append(per_sample_grad_norms(model, x, y).detach().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The score table of the scores stage
# --------------------------------------------------------------------------------------------

def score_table(model: nn.Module, images: np.ndarray, labels: np.ndarray, correct: np.ndarray,
                device="cpu", batch_size: int = 128) -> pd.DataFrame:
    """One row per training sample: ``index, label, loss, gradnorm, forgetting``.

    ``correct`` is the surrogate's (epochs, N) training-forward correctness; ``model`` is the
    surrogate at the chosen epoch (loss and gradient norm are measured on it in eval mode).
    """
    labels = np.asarray(labels)
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[1] != len(labels):
        raise ValueError(f"correct: expected shape (epochs, {len(labels)}), got {correct.shape}")
    if len(images) != len(labels):
        raise ValueError(f"images: {len(images)} images but {len(labels)} labels")
    return pd.DataFrame({
        "index": np.arange(len(labels), dtype=np.int64),
        "label": labels.astype(np.int64),
        "loss": per_sample_loss(model, images, labels, device, batch_size),
        "gradnorm": grad_norms(model, images, labels, device, batch_size),
        "forgetting": forgetting_events(correct),
    }, columns=list(SCORE_COLUMNS))
