"""Building the diffusers U-Net and the noise schedulers from typed configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from meddiff.errors import MeddiffError
from meddiff.options import Options, option


@dataclass
class ModelConfig(Options):
    block_out_channels: list[int] = option([32, 64, 128], "U-Net channels per resolution level (comma-separated)")
    layers_per_block: int = option(2, "residual blocks per level", minimum=1)
    attention_max_resolution: int = option(
        8, "self-attention only where the feature map is at most this many pixels wide (CPU: keep <= 16)", minimum=0
    )
    attention_head_dim: int = option(32, "channels per attention head", minimum=1)
    norm_num_groups: int = option(8, "GroupNorm groups (must divide every channel count)", minimum=1)
    objective: Literal["diffusion", "flow"] = option(
        "diffusion",
        "diffusion: a DDPM noise schedule, the U-Net predicts the noise or v (prediction_type); flow: rectified "
        "flow, x_t = (1 - s) x0 + s noise, the U-Net predicts the velocity noise - x0 (samplers euler, heun, dpm++, "
        "unipc)",
    )
    prediction_type: Literal["epsilon", "v_prediction"] = option(
        "epsilon", "diffusion objective: what the U-Net predicts"
    )
    flow_shift: float = option(
        1.0, "flow objective: noise-level shift s' = k s / (1 + (k - 1) s); > 1 puts more steps at high noise", above=0
    )
    flow_density: Literal["logit_normal", "uniform", "mode"] = option(
        "logit_normal", "flow objective: how training draws the noise level s (SD3's densities)"
    )
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = option(
        "squaredcos_cap_v2", "noise schedule of the training scheduler"
    )
    num_train_timesteps: int = option(1000, "diffusion steps of the training schedule", minimum=2)


def build_unet(
    cfg: ModelConfig, resolution: int, num_labels: int, in_channels: int = 1, cross_attention_dim: int | None = None
) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel. Labels condition it through its own `projection` class embedding (an MLP
    from the 2K-dim condition vector added to the timestep embedding); text through cross-attention to token
    features of width `cross_attention_dim` in the low-resolution blocks (the Stable Diffusion layout). Without
    text, those blocks use self-attention only."""
    text = cross_attention_dim is not None
    attn_block = "CrossAttnDownBlock2D" if text else "AttnDownBlock2D"
    down = []
    for level in range(len(cfg.block_out_channels)):
        attn = resolution // (2**level) <= cfg.attention_max_resolution
        down.append(attn_block if attn else "DownBlock2D")
    up = [name.replace("Down", "Up") for name in reversed(down)]
    conditional = num_labels > 0
    extra = {"cross_attention_dim": cross_attention_dim} if text else {}
    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if text else "UNetMidBlock2D",
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        class_embed_type="projection" if conditional else None,
        projection_class_embeddings_input_dim=2 * num_labels if conditional else None,
        **extra,
    )


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training scheduler, saved with the pipeline: DDPM for the diffusion objective, diffusers' flow-matching
    Euler scheduler (its training sigmas, shifted) for the flow objective."""
    if cfg.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.flow_shift)
    if cfg.objective != "diffusion":
        raise MeddiffError(f"objective must be diffusion or flow, got {cfg.objective!r}")
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise MeddiffError(f"prediction_type must be epsilon or v_prediction, got {cfg.prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


SamplerName = Literal["dpm++", "dpm++3", "unipc", "euler", "heun", "ddim", "pndm", "ddpm", "lcm"]
SAMPLERS: tuple[SamplerName, ...] = get_args(SamplerName)
FLOW_SAMPLERS: tuple[SamplerName, ...] = ("euler", "heun", "dpm++", "dpm++3", "unipc")


def is_flow_schedule(config) -> bool:
    """True for the config of a flow-matching scheduler (the training one, or a flow-mode DPM-Solver/UniPC)."""
    return bool(config.get("use_flow_sigmas")) or ("shift" in config and "beta_schedule" not in config)


def evaluations_per_step(name: str) -> int:
    """Network evaluations one sampler step costs (Heun: two), before guidance doubles them."""
    return 2 if name.lower() == "heun" else 1


def evaluations_per_image(sampler: str, steps: int, guidance: float, guidance_embedded: bool = False) -> int:
    """Network evaluations one image costs: steps x evaluations_per_step, doubled by classifier-free guidance unless
    the model takes the guidance scale as an input (a distilled student)."""
    passes = 1 if guidance == 1 or guidance_embedded else 2
    return steps * evaluations_per_step(sampler) * passes


def make_sampler(name: str, train_config, clip: bool = True, phased: bool = False):
    """A sampling scheduler built from the training scheduler's config. `clip` keeps DDIM/DDPM's x0 estimate in
    the data range [-1, 1]: right for pixels, wrong for latents (pass False). A flow-matching model gets the flow
    form of each sampler (diffusers' FlowMatch Euler/Heun, DPM-Solver++ and UniPC on flow sigmas). Distilled
    students keep their own: LCM, or for a `phased` student its saved DDIM scheduler (trailing grid, eta 0)."""
    name = name.lower()
    if name in ("dpmsolver++", "dpm"):
        name = "dpm++"
    if phased:
        return DDIMScheduler.from_config(train_config)
    if "original_inference_steps" in train_config:  # a distilled (consistency) student: only its own sampler fits
        return LCMScheduler.from_config(train_config)
    if name == "lcm":
        raise MeddiffError("scheduler 'lcm' is for distilled models (meddiff distill); this model is not one")
    if is_flow_schedule(train_config):
        return _flow_sampler(name, train_config)
    if name in ("dpm++", "dpm++3"):
        return DPMSolverMultistepScheduler.from_config(
            train_config,
            algorithm_type="dpmsolver++",
            solver_order=3 if name == "dpm++3" else 2,
            final_sigmas_type="zero",
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(train_config, final_sigmas_type="zero")
    if name == "euler":
        return EulerDiscreteScheduler.from_config(train_config, timestep_spacing="trailing")
    if name == "heun":  # diffusers' Heun on a DDPM schedule starts from sigma ~2e4: its correction step diverges
        raise MeddiffError(
            "scheduler 'heun' is for flow-matching models (objective flow); for this model use dpm++, unipc or euler"
        )
    if name == "ddim":  # trailing: the first step starts at the last timestep (pure noise), whatever the step count
        return DDIMScheduler.from_config(
            train_config, clip_sample=clip, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0
        )
    if name == "pndm":
        return PNDMScheduler.from_config(train_config, skip_prk_steps=True)
    if name == "ddpm":
        return DDPMScheduler.from_config(train_config, clip_sample=clip)  # x0 clipped to the data range
    raise MeddiffError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")


def _flow_sampler(name: str, config):
    steps = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", config.get("flow_shift", 1.0)))
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps, shift=shift)
    if name == "heun":
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=steps, shift=shift)
    flow = {"num_train_timesteps": steps, "prediction_type": "flow_prediction", "use_flow_sigmas": True}
    if name in ("dpm++", "dpm++3"):
        return DPMSolverMultistepScheduler(
            **flow,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_order=3 if name == "dpm++3" else 2,
            final_sigmas_type="zero",
        )
    if name == "unipc":
        return UniPCMultistepScheduler(**flow, flow_shift=shift, final_sigmas_type="zero")
    if name in SAMPLERS:
        raise MeddiffError(
            f"scheduler {name!r} needs a noise (DDPM) schedule; this is a flow-matching model: "
            f"choose one of {', '.join(FLOW_SAMPLERS)}"
        )
    raise MeddiffError(f"unknown scheduler {name!r}; choose one of {', '.join(FLOW_SAMPLERS)}")


ATTENTION = ("auto", "sdpa", "classic")


def largest_attention_tokens(unet) -> int:
    """Tokens (pixels) of the widest feature map a U-Net attends over; 0 without attention."""
    config = getattr(unet, "config", None)
    size = getattr(config, "sample_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    blocks = getattr(config, "down_block_types", None)
    if not isinstance(size, int) or not blocks:  # not a diffusers U-Net (a stand-in, a custom model)
        return 0
    widest = 0
    for level, name in enumerate(blocks):
        if "Attn" in name:
            widest = max(widest, (size // 2**level) ** 2)
    return widest


def choose_attention(kind: str, unet, device_type: str, precision: str) -> str:
    """auto: diffusers' classic attention (bmm + softmax) on CPU in bf16 when attention maps are small (<= 16x16),
    where it measured 13-23 % faster training than PyTorch SDPA (bench/speedups.py); SDPA everywhere else (GPUs,
    fp32 where both tie, and large maps where SDPA's memory saving matters)."""
    if kind not in ATTENTION:
        raise MeddiffError(f"attention must be one of {', '.join(ATTENTION)}, got {kind!r}")
    if kind != "auto":
        return kind
    small = 0 < largest_attention_tokens(unet) <= 256
    return "classic" if device_type == "cpu" and precision == "bf16" and small else "sdpa"


def set_attention(unet, kind: str) -> None:
    """Give every attention layer of a diffusers U-Net the chosen processor (a runtime choice; nothing saved)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not hasattr(unet, "set_attn_processor") or not unet.attn_processors:
        return
    unet.set_attn_processor(AttnProcessor() if kind == "classic" else AttnProcessor2_0())
