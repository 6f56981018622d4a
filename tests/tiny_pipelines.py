"""Tiny diffusers pipelines of every model kind, saved the way users save theirs
(``save_pretrained``), for the tests that take them through the stages. Nothing is downloaded:
the CLIP tokenizer is made from a small vocabulary file written here.

Images are 1 x 16 x 16, so that the digits reference (the metrics' classifier) scores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    LDMPipeline,
    StableDiffusionPipeline,
    UNet2DModel,
    VQModel,
)
from tiny_models import tiny_attn_unet, tiny_cond_unet

NUM_CLASSES = 3  # class-conditional tiny model: labels 0..2, and 3 the "no class" label
NULL_CLASS = NUM_CLASSES
TOKENS = 8  # the tokenizer's max length: text embeddings [P, 8, 8]
# the tiny VAEs: 1 x 16 x 16 images, one downsampling to 8 x 8 latents
VAE = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 8),
    norm_num_groups=4,
    sample_size=16,
)
WORDS = "a the of on in with and red blue green small big digit zero one two cat dog bowl".split()


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def class_unet(seed: int = 0) -> UNet2DModel:
    """The embedded architecture at tiny widths, with a class embedding (num_class_embeds 4)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=NUM_CLASSES + 1,
    ).eval()


def save_class_conditional(path: Path, seed: int = 0) -> Path:
    DDPMPipeline(unet=class_unet(seed), scheduler=_scheduler()).save_pretrained(path)
    return path


def save_latent(path: Path, seed: int = 0) -> Path:
    """An LDMPipeline layout: a VQModel (1 x 16 x 16 images, 2 x 8 x 8 latents) and a UNet on latents."""
    torch.manual_seed(seed)
    vqvae = VQModel(**VAE, latent_channels=2, num_vq_embeddings=16).eval()
    unet = tiny_attn_unet(seed, channels=2)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=_scheduler()).save_pretrained(path)
    return path


def tiny_tokenizer(path: Path):
    """A CLIPTokenizer from a small vocabulary (words, and single characters for the rest)."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [w + "</w>" for w in WORDS] + [
        c + e for c in "abcdefghijklmnopqrstuvwxyz" for e in ("", "</w>")
    ]:
        vocab.setdefault(token, len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=TOKENS)


def save_text_to_image(path: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline layout: AutoencoderKL, a cross-attention UNet on its latents,
    a CLIP text encoder and tokenizer (no safety checker)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-vocab")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    vae = AutoencoderKL(**VAE, latent_channels=4).eval()
    unet = tiny_cond_unet(seed, channels=4)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path
