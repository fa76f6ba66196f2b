"""Tiny random-weight diffusers models built in code (MODELS.md §4 "sd15tiny": real SD1.5 block layout)."""
import torch
from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, \
    UNetMotionModel

CH = (8, 8, 16, 16)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=CH,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
MOTION = dict(block_out_channels=CH, motion_layers_per_block=2, motion_num_attention_heads=2,
              motion_norm_num_groups=4, motion_max_seq_length=32, use_motion_mid_block=True)
UNET3D = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=CH,
              down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
              up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
              cross_attention_dim=32, attention_head_dim=8, norm_num_groups=4)
CONTROLNET = dict(in_channels=4, conditioning_channels=3, layers_per_block=2, block_out_channels=CH,
                  down_block_types=UNET["down_block_types"], cross_attention_dim=32, attention_head_dim=2,
                  norm_num_groups=4, conditioning_embedding_out_channels=(8, 16, 32, 64))
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64, scaling_factor=0.18215)


def randomize(module, seed, std=0.05):
    """Seeded small-normal weights everywhere (fresh diffusers models have zero-initialised output convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.dim() == 1 and ("norm" in name and name.endswith("weight")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def unet2d(seed=0, in_channels=4):
    return randomize(UNet2DConditionModel(**dict(UNET, in_channels=in_channels)), seed)


def motion_unet(seed=0, unet=None):
    unet = unet or unet2d(seed)
    adapter = randomize(MotionAdapter(**MOTION), seed + 1)
    return UNetMotionModel.from_unet2d(unet, adapter).eval()


def unet3d(seed=0):
    return randomize(UNet3DConditionModel(**UNET3D), seed)


def controlnet(seed=0):
    return randomize(ControlNetModel(**CONTROLNET), seed)


def vae(seed=0):
    return randomize(AutoencoderKL(**VAE), seed, std=0.1)


def text(seed=0, n=1, dim=32):
    return torch.randn(n, 77, dim, generator=torch.Generator().manual_seed(seed))
