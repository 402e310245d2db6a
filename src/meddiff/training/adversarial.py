"""Side networks trained next to the model: the discriminator of the adversarial losses (2D and 3D autoencoders,
few-step distillation) and the fake-score network of distribution matching (distillation). Their optimizers, how the
loop's accelerator holds them, and their update after each step of the model.

A side network is prepared (placed on the run's device and checkpointed with it) but never DDP-wrapped, since it
also runs inside the model's loss: with several processes its gradients are averaged by hand. Its own loss is never
multiplied by the run's fp16 loss scale, so its optimizer steps without the run's GradScaler (which would otherwise
divide unscaled gradients by the scale and advance itself twice per step)."""

from __future__ import annotations

from typing import Any

import torch


def discriminator_optimizer(discriminator: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with VQGAN's discriminator betas (0.5, 0.9)."""
    return torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.9))


def prepare_discriminator(accelerator, discriminator: torch.nn.Module, lr: float) -> tuple[Any, Any]:
    """(discriminator, optimizer) as the run holds them: placed and checkpointed, not DDP-wrapped, no loss scaler."""
    return prepare_side_network(accelerator, discriminator, discriminator_optimizer(discriminator, lr))


def prepare_side_network(accelerator, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """(network, optimizer) as the run holds them: placed and checkpointed, not DDP-wrapped, no loss scaler."""
    prepared = accelerator.prepare_model(network, evaluation_mode=accelerator.num_processes > 1)
    prepared_optimizer: Any = accelerator.prepare_optimizer(optimizer)
    prepared_optimizer.scaler = None
    return prepared, prepared_optimizer


def update_side_network(network: torch.nn.Module, optimizer, loss: torch.Tensor, accelerator=None) -> None:
    """One optimizer step of a side network on `loss` (gradients averaged over processes where there are several)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    step_side_network(network, optimizer, accelerator)


def step_side_network(network: torch.nn.Module, optimizer, accelerator=None, scaler=None) -> None:
    """The optimizer step on the gradients already accumulated in `network` (averaged over processes where there
    are several; unscaled and skipped when not finite by `scaler`, a GradScaler, where one scaled them)."""
    if accelerator is not None and accelerator.num_processes > 1:
        for p in network.parameters():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
