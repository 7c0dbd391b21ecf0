import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poisonflow.models import build_model
from poisonflow.scores import (
    direct_sq_norm,
    forgetting_events,
    grad_norms,
    gram_is_cheaper,
    gram_sq_norm,
    outer_product_sum_sq_norm,
    per_sample_grad_norms,
    per_sample_grad_norms_loop,
    per_sample_loss,
    score_table,
)
from poisonflow.trainer import images_to_tensor, to_float


def test_forgetting_events_counts_correct_to_wrong_transitions():
    correct = np.array([
        # s0 never correct, s1 forgotten twice, s2 learned at epoch 1 and kept,
        # s3 correct from the start then forgotten once at the end, s4 correct every epoch
        [0, 1, 0, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 1, 1, 0, 1],
    ], dtype=bool)
    events = forgetting_events(correct)
    assert events.dtype == np.int64
    np.testing.assert_array_equal(events, [5, 2, 0, 1, 0])


def test_forgetting_events_rejects_a_vector():
    with pytest.raises(ValueError, match="correct"):
        forgetting_events(np.ones(4, dtype=bool))


def _tiny_model(arch: str, image_size: int = 16, seed: int = 0) -> nn.Module:
    """A width-4 model with non-trivial BatchNorm running stats and affine parameters."""
    torch.manual_seed(seed)
    model = build_model({"arch": arch, "width": 4}, num_classes=5, image_size=image_size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, image_size, image_size) * 1.5 - 0.2)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    model.eval()
    return model


def _inputs(n: int = 12, image_size: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, image_size, image_size, generator=generator), torch.randint(0, 5, (n,), generator=generator)


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_batched_grad_norms_equal_the_per_sample_loop(arch):
    model = _tiny_model(arch)
    x, y = _inputs()
    expected = per_sample_grad_norms_loop(model, x, y)
    batched = per_sample_grad_norms(model, x, y)
    assert batched.shape == (12,)
    assert float(expected.min()) > 0
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=0)
    # The hooks are gone afterwards: a plain forward/backward leaves the model as before.
    assert all(not m._forward_hooks for m in model.modules())


def test_batched_grad_norms_with_a_pruned_mask_and_a_frozen_layer():
    model = _tiny_model("resnet18", image_size=8)
    model.channel_mask[::3] = 0.0
    model.body[0].weight.requires_grad_(False)
    x, y = _inputs(n=6, image_size=8)
    torch.testing.assert_close(per_sample_grad_norms(model, x, y), per_sample_grad_norms_loop(model, x, y),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("positions", [1, 3, 40])
def test_both_sq_norm_forms_match_the_explicit_gradient(positions):
    generator = torch.Generator().manual_seed(positions)
    grad = torch.randn(4, 5, positions, generator=generator, dtype=torch.float64)
    act = torch.randn(4, 6, positions, generator=generator, dtype=torch.float64)
    explicit = torch.einsum("npl,nql->npq", grad, act).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(gram_sq_norm(grad, act), explicit)
    torch.testing.assert_close(direct_sq_norm(grad, act), explicit)
    torch.testing.assert_close(outer_product_sum_sq_norm(grad, act), explicit)


def test_gram_form_is_chosen_only_where_it_has_fewer_multiply_adds():
    assert gram_is_cheaper(5, 6, 1)  # 11 < 30
    assert not gram_is_cheaper(5, 6, 3)  # 99 > 90
    assert gram_is_cheaper(512, 4608, 16)  # last ResNet-18 stage at 32 px
    assert not gram_is_cheaper(64, 576, 1024)  # first stage


class _TokenNet(nn.Module):
    """Strided, dilated, biased convs (one per weight-gradient form) and linear layers on (N, T, F)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, bias=True)  # 9 px → 5 px
        self.conv2 = nn.Conv2d(4, 16, 3, stride=2, padding=2, dilation=2, bias=True)  # 5 px → 3 px
        self.embed = nn.Linear(16, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        tokens = self.conv2(torch.tanh(self.conv1(x))).flatten(2).transpose(1, 2)  # (N, 9, 16)
        return self.head(torch.tanh(self.embed(tokens)).mean(dim=1))


def test_batched_grad_norms_on_token_linears_and_strided_convs():
    assert not gram_is_cheaper(4, 3 * 9, 25) and gram_is_cheaper(16, 4 * 9, 9)  # conv1 direct, conv2 Gram
    torch.manual_seed(0)
    model = _TokenNet()
    x, y = torch.rand(5, 3, 9, 9), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(per_sample_grad_norms(model, x, y), per_sample_grad_norms_loop(model, x, y),
                               rtol=1e-4, atol=0)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x.flatten(1)[:, :4]))


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.Flatten(), nn.Linear(3, 2)), "groups=1"),
    (nn.Sequential(nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 2)), "LayerNorm"),
    (_Twice(), "more than once"),
])
def test_batched_grad_norms_refuse_unsupported_models(model, message):
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    with pytest.raises((ValueError, RuntimeError), match=message):
        per_sample_grad_norms(model, x, y)


def test_per_sample_loss_is_unreduced_cross_entropy(noise_images):
    model = _tiny_model("convnet", image_size=8)
    images, labels = noise_images(10, seed=2)
    with torch.no_grad():
        expected = F.cross_entropy(model(to_float(images_to_tensor(images))), torch.from_numpy(labels),
                                   reduction="none").numpy()
    losses = per_sample_loss(model, images, labels, batch_size=3)
    assert losses.shape == (10,)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_score_table_has_one_row_per_sample_with_every_score(noise_images):
    model = _tiny_model("convnet", image_size=8)
    images, labels = noise_images(10, seed=2)
    correct = np.zeros((3, 10), dtype=bool)
    correct[0, :5] = True  # samples 0–4 forgotten once; 5–9 never learned → 3 (the epoch count)
    table = score_table(model, images, labels, correct, batch_size=4)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["index", "label", "loss", "gradnorm", "forgetting"]
    np.testing.assert_array_equal(table["index"], np.arange(10))
    np.testing.assert_array_equal(table["label"], labels)
    np.testing.assert_array_equal(table["forgetting"], [1] * 5 + [3] * 5)
    np.testing.assert_allclose(table["loss"], per_sample_loss(model, images, labels), rtol=1e-6)
    reference = per_sample_grad_norms_loop(model, to_float(images_to_tensor(images)), torch.from_numpy(labels))
    np.testing.assert_allclose(table["gradnorm"], reference.numpy(), rtol=1e-4)
    np.testing.assert_allclose(grad_norms(model, images, labels, batch_size=10), table["gradnorm"], rtol=1e-6)


def test_score_table_rejects_a_mismatched_correctness_matrix(noise_images):
    model = _tiny_model("convnet", image_size=8)
    images, labels = noise_images(10, seed=2)
    with pytest.raises(ValueError, match="correct"):
        score_table(model, images, labels, np.zeros((3, 9), dtype=bool))
