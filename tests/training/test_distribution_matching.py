"""Distribution matching (DMD): the student's update is the normalised score difference, the fake score learns the
student's images with the teacher's objective."""

import pytest
import torch

from meddiff.training.distribution_matching import (
    LEVELS,
    distribution_matching_loss,
    fake_score_loss,
    renoising_timesteps,
)


def test_the_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 1, 4, 4, generator=g, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    distribution_matching_loss(images, x0_real, x0_fake).backward()
    scale = (images.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(images.grad, (x0_fake - x0_real) / scale / images.numel())
    # where the fake score agrees with the teacher there is nothing to match: no gradient
    same = images.detach().clone().requires_grad_(True)
    distribution_matching_loss(same, x0_real, x0_real).backward()
    assert torch.count_nonzero(same.grad) == 0
    # a descent step moves the images towards the teacher's denoising and away from the fake score's
    step = images.detach() - 1e-2 * images.grad / images.grad.abs().max()
    assert (step - x0_real).norm() < (images.detach() - x0_real).norm()
    assert (step - x0_fake).norm() > (images.detach() - x0_fake).norm()


def test_renoising_levels_stay_inside_dmd_range():
    t = renoising_timesteps(10_000, 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) >= LEVELS[0] * 1000 and int(t.max()) <= LEVELS[1] * 1000
    assert int(t.max()) - int(t.min()) > 900  # the whole range is used


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_fake_scores_target_is_what_the_parametrisation_outputs(prediction):
    """The fake score learns the teacher's objective through diffusers' scheduler (add_noise, get_velocity); read back
    by the distillation's x0_and_eps, its target gives the clean image and the noise."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from meddiff.training.methods.distill import x0_and_eps

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 1, 3, 3, generator=g)
    seen = {}

    def network(noisy, t, class_labels=None):
        seen.update(noisy=noisy, t=t)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    loss = fake_score_loss(network, x0, scheduler, {}, torch.Generator().manual_seed(3))
    draw = torch.Generator().manual_seed(3)  # the loss's draws, in its order
    t = torch.randint(0, 1000, (2,), generator=draw)
    noise = torch.randn(x0.shape, generator=draw)
    torch.testing.assert_close(seen["t"], t)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    target = scheduler.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
    torch.testing.assert_close(loss, target.pow(2).mean())  # a zero output: the loss is the target's mean square
    x0_back, eps_back = x0_and_eps(target, seen["noisy"], abar, prediction)
    torch.testing.assert_close(x0_back, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_back, noise, atol=1e-4, rtol=1e-4)


def test_the_fake_score_learns_the_students_images():
    """A denoiser trained with fake_score_loss on a fixed set of images gets better at denoising them."""
    from types import SimpleNamespace

    class Denoiser(torch.nn.Module):  # the U-Net call signature the loss uses; the timestep as an input channel
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(2, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 1, 3, padding=1)
            )

        def forward(self, x, t, class_labels=None):
            level = (t.float() / 1000).view(-1, 1, 1, 1).expand_as(x)
            return SimpleNamespace(sample=self.net(torch.cat([x, level], 1)))

    torch.manual_seed(0)
    net = Denoiser()
    images = torch.zeros(16, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0  # one "student image"
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def measured():
        with torch.no_grad():
            return float(fake_score_loss(net, images, scheduler, {}, torch.Generator().manual_seed(99)))

    before = measured()
    for i in range(60):
        loss = fake_score_loss(net, images, scheduler, {}, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert measured() < 0.5 * before
