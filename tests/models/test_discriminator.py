"""meddiff.models.discriminator: the patch discriminator's output grid and the hinge losses' closed forms."""

import pytest
import torch

from meddiff.models.discriminator import PatchDiscriminator, discriminator_hinge_loss, generator_adversarial_loss


@pytest.mark.parametrize("layers, size, patches", [(3, 32, 4), (2, 32, 8), (3, 64, 8)])
def test_one_logit_per_patch(layers, size, patches):
    disc = PatchDiscriminator(in_channels=1, width=8, layers=layers)
    out = disc(torch.randn(2, 1, size, size))
    assert out.shape == (2, 1, patches, patches)  # each stride-2 layer halves the grid


def test_width_is_capped_and_gradients_reach_the_input():
    disc = PatchDiscriminator(in_channels=3, width=128, layers=4)
    assert max(m.out_channels for m in disc.modules() if isinstance(m, torch.nn.Conv2d)) == 256
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    disc(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hinge_losses_match_their_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert discriminator_hinge_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0  # confident: no loss
    assert generator_adversarial_loss(fake).item() == pytest.approx(0.5 / 3)  # -mean(fake)


def test_a_conditional_discriminator_judges_the_image_under_its_condition():
    from meddiff.models.discriminator import patch_layers

    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=1, width=8, layers=2, condition_dim=3)
    torch.nn.init.normal_(disc.embed.weight)
    x = torch.randn(2, 1, 32, 32)
    a = disc(x, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    b = disc(x, torch.tensor([[0.0, 1, 0], [1.0, 0, 0]]))
    assert a.shape == (2, 1, 8, 8)
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])  # only the image whose condition changed
    # no condition (all zeros) adds nothing: the unconditional patch logits of the same network
    torch.testing.assert_close(disc(x, torch.zeros(2, 3)), disc.net(x))
    with pytest.raises(ValueError, match="conditional"):
        disc(x)
    assert [patch_layers(s) for s in (8, 16, 32, 64, 256)] == [1, 2, 3, 3, 3]  # grids of 4x4 patches or more
