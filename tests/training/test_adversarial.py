"""meddiff.training.adversarial: the discriminator's optimizer steps as a plain Adam would, even in a run whose
accelerator holds an fp16 loss scaler (its loss is never scaled), and leaves no gradients behind."""

import copy

import torch
from accelerate import Accelerator

from meddiff.models.discriminator import PatchDiscriminator
from meddiff.training.adversarial import discriminator_optimizer, prepare_discriminator, update_side_network


def test_the_discriminator_steps_like_plain_adam_despite_the_runs_loss_scaler():
    torch.manual_seed(0)
    disc = PatchDiscriminator(width=8, layers=2)
    reference, initial = copy.deepcopy(disc), copy.deepcopy(disc)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what an fp16 run on a GPU holds
    prepared, optimizer = prepare_discriminator(accelerator, disc, lr=1e-3)
    assert optimizer.scaler is None
    x = torch.randn(2, 1, 32, 32)
    update_side_network(prepared, optimizer, prepared(x).mean(), accelerator)
    plain = discriminator_optimizer(reference, lr=1e-3)
    assert plain.defaults["betas"] == (0.5, 0.9)
    update_side_network(reference, plain, reference(x).mean())
    for a, b in zip(prepared.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)  # not divided by the scale: the same step
        assert a.grad is None
    assert any(not torch.equal(a, b) for a, b in zip(prepared.parameters(), initial.parameters()))  # it stepped
    assert accelerator.scaler.get_scale() == 2.0**16  # the run's scaler did not advance
