"""Fine-tuning a pretrained Stable Diffusion on medical images with prompts built from labels or reports
(method "finetune"; `meddiff finetune --method ...`). One method class, one loop; what trains is chosen by
`config.finetune.method`:

- unet: the U-Net (VAE and text encoder frozen; prompt features cached), RoentGen's most promising setting;
- unet+text: U-Net and text encoder together (RoentGen's best fidelity);
- text: the text encoder only;
- dreambooth: an instance prompt on every training image plus prior preservation on class images the base
  model generates first (cached in RUN/class_images), optionally with the text encoder;
- lora: peft LoRA adapters on the U-Net's attention projections (optionally the text encoder's); exports only
  the adapter weights, loadable with diffusers' load_lora_weights;
- textual-inversion: new token(s) initialised from a word; only their embedding rows learn (every other row is
  restored after each step) and only they are exported (learned_embeds.safetensors, load_textual_inversion).

`finetune.text_encoder` swaps in a domain encoder (RadBERT, SapBERT, the packaged MiniLM...); when its width
differs from the U-Net's cross-attention width the U-Net gets diffusers' own `encoder_hid_proj` (text_proj), a
learned linear projection saved in the U-Net config, so the export still loads with plain diffusers.

Images are 1-channel: they enter the RGB autoencoder as three equal channels and are encoded once; generated
images are the mean of the decoded channels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from meddiff.conditioning.labels import LabelCodec
from meddiff.conditioning.text import PromptCache, TextConfig, load_text_encoder, text_width
from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import encode_moments
from meddiff.models.pipeline import MedDiffusionPipeline, encode_prompt
from meddiff.models.stable_diffusion import load_stable_diffusion, to_rgb
from meddiff.models.storage import ADAPTER_FILE, PIPELINE_DIR, save_pipeline
from meddiff.training.latent_cache import encoded_latents
from meddiff.training.methods.base import TrainingMethod, register_method
from meddiff.training.methods.diffusion import PixelDiffusion

FINETUNE_METHODS = ("unet", "unet+text", "text", "dreambooth", "lora", "textual-inversion")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@register_method
class StableDiffusionFinetune(PixelDiffusion):
    name = "finetune"

    def __init__(self, config, dataset, accelerator=None):
        TrainingMethod.__init__(self, config, dataset, accelerator)
        ft = config.finetune
        if ft.method not in FINETUNE_METHODS:
            raise MeddiffError(f"unknown fine-tuning method {ft.method!r}; choose from {', '.join(FINETUNE_METHODS)}")
        if not ft.pretrained:
            raise MeddiffError("fine-tuning needs --pretrained (a Stable Diffusion hub id or local diffusers folder)")
        if ft.method == "dreambooth" and not ft.instance_prompt:
            raise MeddiffError("dreambooth needs --instance-prompt (e.g. \"chest x-ray with sks pleural effusion\")")
        parts = load_stable_diffusion(ft.pretrained)
        self.mode = ft.method
        self.noise_scheduler = parts.scheduler
        self._vae = parts.vae.requires_grad_(False).eval()
        factor = 2 ** (len(self._vae.config.block_out_channels) - 1)
        if config.resolution % factor:
            raise MeddiffError(f"--resolution {config.resolution} is not a multiple of the autoencoder's factor {factor}")
        self.tokenizer, self.text_encoder = parts.tokenizer, parts.text_encoder
        unet = parts.unet
        if ft.text_encoder:
            self.tokenizer, self.text_encoder = load_text_encoder(TextConfig(encoder=ft.text_encoder,
                                                                             max_tokens=self.tokenizer.model_max_length))
            _project_text(unet, text_width(self.text_encoder))
        unet.register_to_config(sample_size=config.resolution // factor)  # exports generate at the trained size
        self._vae.register_to_config(sample_size=config.resolution)
        self.use_labels, self.use_text = False, True
        self.codec = LabelCodec([])
        self.prompt_cache = None
        self.new_token_ids: list[int] = []
        self._setup_trainable(unet, ft)
        if self.prompt_cache is not None:  # a frozen text encoder: prompts are encoded (and cached) on the device
            self.text_encoder.to(self.device)
        if ft.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self._trains_text():
                self.text_encoder.gradient_checkpointing_enable()
        self._encode_training_images()
        if self.mode == "dreambooth" and ft.class_prompt and ft.prior_loss_weight > 0:
            self._prepare_class_images(unet)

    # what trains -----------------------------------------------------------------------------------------------
    def _trains_text(self) -> bool:
        ft = self.config.finetune
        return self.mode in ("unet+text", "text", "textual-inversion") or (
            self.mode == "dreambooth" and ft.train_text_encoder) or (self.mode == "lora" and ft.lora_text_encoder)

    def _setup_trainable(self, unet, ft) -> None:
        encoder = self.text_encoder
        unet.requires_grad_(self.mode in ("unet", "unet+text", "dreambooth"))
        encoder.requires_grad_(self.mode in ("unet+text", "text") or (self.mode == "dreambooth" and ft.train_text_encoder))
        if self.mode == "lora":
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS))
            if ft.lora_text_encoder:
                encoder.add_adapter(LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian",
                                               target_modules=TEXT_LORA_TARGETS))
        if self.mode == "textual-inversion":
            self._add_tokens(ft)
            encoder.get_input_embeddings().weight.requires_grad_(True)
        if getattr(unet, "encoder_hid_proj", None) is not None and ft.text_encoder:
            unet.encoder_hid_proj.requires_grad_(True)  # a new projection always learns
        if self._trains_text():
            self._model = torch.nn.ModuleDict({"unet": unet, "text_encoder": encoder})
        else:
            self.prompt_cache = PromptCache(self.tokenizer, encoder)
            self._model = unet if any(p.requires_grad for p in unet.parameters()) else torch.nn.ModuleDict(
                {"unet": unet})
        if not any(p.requires_grad for p in self._model.parameters()):
            raise MeddiffError(f"method {self.mode!r} left nothing to train")

    def _add_tokens(self, ft) -> None:
        tokens = [ft.placeholder_token] + [f"{ft.placeholder_token}_{i}" for i in range(1, ft.num_vectors)]
        if self.tokenizer.add_tokens(tokens) != len(tokens):
            raise MeddiffError(f"the tokenizer already has {ft.placeholder_token!r}; choose another --placeholder-token")
        init = self.tokenizer.encode(ft.initializer_token, add_special_tokens=False)
        if len(init) != 1:
            raise MeddiffError(f"--initializer-token {ft.initializer_token!r} is {len(init)} tokens; use a single-token "
                               "word (e.g. chest, lung, xray)")
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.new_token_ids = self.tokenizer.convert_tokens_to_ids(tokens)
        weight = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.new_token_ids] = weight[init[0]].clone()
        self.original_embeddings = weight.detach().clone()
        self.placeholder = " ".join(tokens)

    @property
    def has_unused_parameters(self) -> bool:  # a trained text encoder has parameters the loss never reaches
        return self._trains_text()

    @property
    def uses_ema(self) -> bool:  # textual inversion restores most of its matrix every step: no EMA of it
        return self.mode != "textual-inversion"

    # data ------------------------------------------------------------------------------------------------------
    def _encode_training_images(self) -> None:
        """Encoded once on the accelerator into the latent cache (three equal channels into the RGB autoencoder);
        later runs on the same images and autoencoder read the stored latents."""
        self.latents = encoded_latents(self._vae, self.dataset, self.config.resolution, self.accelerator,
                                       transform=to_rgb, tag="rgb3")
        self.scale = float(self._vae.config.scaling_factor)

    device_keys = ("mean", "std")

    def batch_source(self):
        return self.latents

    def training_prompt(self, index: int) -> str:
        ft = self.config.finetune
        if self.mode == "dreambooth":
            return ft.instance_prompt
        prompt = self.dataset.prompts[index] if self.dataset.prompts else ""
        if self.mode == "textual-inversion":
            return ft.template.format(token=self.placeholder, prompt=prompt).strip()
        return prompt

    def _prepare_class_images(self, unet) -> None:
        """Prior preservation: class images from the base model, generated once and cached under RUN/class_images."""
        from accelerate import PartialState

        from meddiff.data.io import read_image

        ft = self.config.finetune
        folder = Path(self.config.out) / "class_images"
        key = {"pretrained": ft.pretrained, "class_prompt": ft.class_prompt, "resolution": self.config.resolution}
        meta = folder / "class_images.json"
        n = ft.num_class_images
        if meta.is_file() and json.loads(meta.read_text()).get("key") != key:
            raise MeddiffError(f"{folder} holds class images of another model or prompt; use a new --out")
        with PartialState().main_process_first():  # several processes: the main one generates, the others read
            self._generate_class_images(unet, folder, meta, key, n)
        files = sorted(folder.glob("*.png"))[:n]
        stack = torch.from_numpy(np.stack([read_image(f) for f in files])).float()[:, None] * 2 - 1
        self.class_mean, self.class_std = encode_moments(self._vae, to_rgb(stack))

    def _generate_class_images(self, unet, folder: Path, meta: Path, key: dict, n: int) -> None:
        from meddiff.data.io import write_png
        from meddiff.sampling.generate import SamplingSettings, sample

        ft = self.config.finetune
        have = sorted(folder.glob("*.png"))
        if len(have) < n:
            folder.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"key": key}))
            pipe = MedDiffusionPipeline(unet=unet, scheduler=self.noise_scheduler, vae=self._vae,
                                        text_encoder=self.text_encoder, tokenizer=self.tokenizer)
            pipe.set_progress_bar_config(disable=True)
            pipe.to(self.device)  # the base model samples on the run's device
            todo = list(range(len(have), n))
            settings = SamplingSettings(steps=25, guidance=self.config.guidance, seed=self.config.seed + 7919,
                                        batch_size=8)
            images = sample(pipe, torch.zeros(len(todo), 0), settings, indices=todo, prompts=[ft.class_prompt] * len(todo),
                            progress=True)
            for i, image in zip(todo, images):
                write_png(folder / f"{i:05d}.png", image)

    # the loss --------------------------------------------------------------------------------------------------
    def model_space(self):
        return self._vae.config.latent_channels, self.config.resolution // 2 ** (len(self._vae.config.block_out_channels) - 1)

    def _latents(self, mean, std, generator):
        mean, std = mean.float(), std.float()
        return (mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)) * self.scale

    def _prompt_features(self, model, prompts: list[str], device) -> torch.Tensor:
        if self.prompt_cache is not None:
            return self.prompt_cache(prompts).to(device)
        encoder = model["text_encoder"]
        return encode_prompt(self.tokenizer, encoder, prompts, device)

    def loss(self, model, batch, generator):
        unet = model["unet"] if isinstance(model, torch.nn.ModuleDict) else model
        device = next(unet.parameters()).device
        idx = batch["index"]
        keep = torch.rand(len(idx), generator=generator) >= self.config.cond_dropout
        prompts = [self.training_prompt(i) if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
        x0 = self._latents(batch["mean"], batch["std"], generator)
        n_instance = len(prompts)
        if self.class_latents_ready:
            cidx = torch.randint(0, len(self.class_mean), (len(idx),), generator=generator)
            x0 = torch.cat([x0, self._latents(self.class_mean[cidx].to(x0.device), self.class_std[cidx].to(x0.device),
                                              generator)])
            prompts = prompts + [self.config.finetune.class_prompt] * len(cidx)
        states = self._prompt_features(model, prompts, device)
        per_sample = self.denoising_loss(unet, x0.to(device), {"encoder_hidden_states": states}, generator)
        loss = per_sample[:n_instance].mean()
        if self.class_latents_ready:
            loss = loss + self.config.finetune.prior_loss_weight * per_sample[n_instance:].mean()
        return loss

    @property
    def class_latents_ready(self) -> bool:
        return hasattr(self, "class_mean")

    def after_step(self, model, batch, generator, step):
        if self.new_token_ids:  # textual inversion: every row but the new tokens' stays as it was
            encoder = model["text_encoder"]
            weight = encoder.get_input_embeddings().weight
            keep = torch.ones(weight.shape[0], dtype=torch.bool)
            keep[self.new_token_ids] = False
            with torch.no_grad():
                weight[keep] = self.original_embeddings[keep].to(weight.device, weight.dtype)
        every = self.config.finetune.validation_every
        if every and (step + 1) % every == 0 and self.is_main_process:
            self.validate(model, Path(self.config.out) / "validation" / f"step-{step + 1:07d}.png")

    # validation and export -------------------------------------------------------------------------------------
    def _pipeline(self, model) -> MedDiffusionPipeline:
        unet = model["unet"] if isinstance(model, torch.nn.ModuleDict) else model
        encoder = model["text_encoder"] if isinstance(model, torch.nn.ModuleDict) and "text_encoder" in model \
            else self.text_encoder
        pipe = MedDiffusionPipeline(unet=unet, scheduler=self.noise_scheduler, vae=self._vae, text_encoder=encoder,
                                    tokenizer=self.tokenizer, label_names=self.dataset.label_names)
        pipe.set_progress_bar_config(disable=True)
        # the frozen autoencoder and text encoder join the U-Net on the run's device (validation, export)
        return pipe.to(next(unet.parameters()).device)

    def validation_prompts(self) -> list[str]:
        ft = self.config.finetune
        if self.mode == "dreambooth":
            return [ft.instance_prompt] + ([ft.class_prompt] if ft.class_prompt else [])
        if self.mode == "textual-inversion":
            return [ft.template.format(token=self.placeholder, prompt=p).strip() for p in ft.validation_prompts]
        return list(ft.validation_prompts)

    @torch.no_grad()
    def validate(self, model, path: Path) -> Path:
        """A grid: one row per validation prompt, fixed seeds (comparable across steps)."""
        from meddiff.sampling.generate import SamplingSettings, sample
        from meddiff.sampling.grid import save_grid, upscale_for

        was_training = model.training
        model.eval()
        prompts = self.validation_prompts()
        k = self.config.finetune.validation_images
        rows = [p for p in prompts for _ in range(k)]
        settings = SamplingSettings(steps=self.config.sample_steps, guidance=self.config.guidance, seed=self.config.seed,
                                    batch_size=16)
        images = sample(self._pipeline(model), torch.zeros(len(rows), 0), settings, prompts=rows, progress=False)
        model.train(was_training)
        save_grid(path, images, columns=k, upscale=upscale_for(self.config.resolution))
        path.with_suffix(".txt").write_text("".join(f"row {r + 1}: {p}\n" for r, p in enumerate(prompts)))
        return path

    def export(self, model, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        self.validate(model, out_dir / "validation" / "final.png")
        ft = self.config.finetune
        if self.mode == "lora":
            return self._export_lora(model, out_dir / "lora")
        if self.mode == "textual-inversion":
            return self._export_embeddings(model, out_dir / "textual_inversion")
        pipe = self._pipeline(model)
        folder = save_pipeline(out_dir / PIPELINE_DIR, pipe.unet, self.noise_scheduler, self.dataset.label_names,
                               vae=self._vae, text_encoder=pipe.text_encoder, tokenizer=self.tokenizer)
        (folder / ADAPTER_FILE).unlink(missing_ok=True)
        (folder / "finetune.json").write_text(json.dumps({"pretrained": ft.pretrained, "method": self.mode,
                                                          "text_encoder": ft.text_encoder or "pretrained CLIP"}))
        return folder

    def _export_lora(self, model, folder: Path) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = model["unet"] if isinstance(model, torch.nn.ModuleDict) else model
        text_layers = None
        if self.config.finetune.lora_text_encoder:
            text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model["text_encoder"]))
        folder.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            text_encoder_lora_layers=text_layers, safe_serialization=True)
        self._write_adapter_note(folder, "lora", "pytorch_lora_weights.safetensors")
        return folder

    def _export_embeddings(self, model, folder: Path) -> Path:
        from safetensors.torch import save_file

        weight = model["text_encoder"].get_input_embeddings().weight.detach().cpu()
        folder.mkdir(parents=True, exist_ok=True)
        token = self.config.finetune.placeholder_token
        save_file({token: weight[self.new_token_ids].clone().contiguous()}, str(folder / "learned_embeds.safetensors"))
        self._write_adapter_note(folder, "textual-inversion", "learned_embeds.safetensors", token=token,
                                 template=self.config.finetune.template)
        return folder

    def _write_adapter_note(self, folder: Path, kind: str, weights: str, **extra) -> None:
        ft = self.config.finetune
        note = {"kind": kind, "base": ft.pretrained, "weights": weights, "resolution": self.config.resolution,
                "label_names": self.dataset.label_names, **extra}
        (folder / ADAPTER_FILE).write_text(json.dumps(note, indent=2))

    def extra_state(self) -> dict:
        return {"mode": self.mode}

    def load_extra_state(self, state: dict) -> None:
        if state and state.get("mode") not in (None, self.mode):
            raise MeddiffError(f"this run was trained with --method {state['mode']}; resume it with the same method")


def _project_text(unet, width: int) -> None:
    """Give the U-Net diffusers' text_proj (encoder_hid_proj) from `width` to its cross-attention width."""
    target = unet.config.cross_attention_dim
    if width == target:
        return
    unet.register_to_config(encoder_hid_dim=width, encoder_hid_dim_type="text_proj")
    unet.encoder_hid_proj = torch.nn.Linear(width, target)
