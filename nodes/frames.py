"""IMAGE <-> LATENT with an image model's VAE, in frame chunks (OOM back-off in core); region masks sized from a
video."""
from __future__ import annotations

import comfy.model_management as mm

from ..core.bivdiff import region_mask
from ..core.latents import decode_video, encode_video, vae_scale
from . import runtime, types
from .api import io


def chunk_input():
    return io.Int.Input("frames_per_chunk", default=8, min=1, max=256,
                        tooltip="Frames sent through the VAE at once; lower it if you run out of memory (it is also "
                                "halved automatically on a GPU out-of-memory error).")


class VBEncodeFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBEncodeFrames", display_name="Encode Frames (VideoBridge)", category="VideoBridge/latents",
            description="Encodes video frames (IMAGE batch) with the image model's VAE into a LATENT (posterior "
                        "mean; unscaled, like core VAEEncode, so core nodes can read it).",
            inputs=[types.ImageModel.Input("image_model", tooltip="Model whose VAE encodes the frames."),
                    io.Image.Input("images", tooltip="Video frames [frames, H, W, 3]; H and W multiples of 8."),
                    chunk_input()],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Clean latent [frames, 4, H/8, W/8].")])

    @classmethod
    def execute(cls, image_model, images, frames_per_chunk) -> io.NodeOutput:
        device = runtime.load(image_model.vae)
        pixels = runtime.image_to_video(images, "images", device)
        vae = image_model.model.vae
        progress = runtime.Progress(-(-pixels.shape[2] // frames_per_chunk))
        z = encode_video(vae, pixels, chunk=frames_per_chunk, callbacks=progress.callbacks)
        return io.NodeOutput(runtime.to_latent(z, vae_scale(vae)))


class VBDecodeFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBDecodeFrames", display_name="Decode Frames (VideoBridge)", category="VideoBridge/latents",
            description="Decodes a LATENT video into frames with the image model's VAE (BIVDiff decodes every "
                        "model's latents with the SD1.5 VAE).",
            inputs=[types.ImageModel.Input("image_model", tooltip="Model whose VAE decodes the latent."),
                    io.Latent.Input("latent", tooltip="Latent video [frames, 4, h, w] (unscaled, ComfyUI convention)."),
                    chunk_input()],
            outputs=[io.Image.Output(display_name="images", tooltip="Decoded frames [frames, 8h, 8w, 3] in 0..1.")])

    @classmethod
    def execute(cls, image_model, latent, frames_per_chunk) -> io.NodeOutput:
        device = runtime.load(image_model.vae)
        vae = image_model.model.vae
        z = runtime.from_latent(latent, "latent", vae_scale(vae), device)
        progress = runtime.Progress(-(-z.shape[2] // frames_per_chunk))
        pixels = decode_video(vae, z, chunk=frames_per_chunk, callbacks=progress.callbacks)
        return io.NodeOutput(runtime.video_to_image(pixels))


REGIONS = {"top and bottom (outpaint)": "horizontal", "left and right (outpaint)": "vertical",
           "centre (inpaint)": "centre"}


class VBRegionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBRegionMask", display_name="Region Mask (VideoBridge)", category="VideoBridge/latents",
            description="A MASK the size of the video (1 = repaint) for inpainting or outpainting: the top and bottom "
                        "bands, the left and right bands, or the centre. The size follows the connected frames, so "
                        "it is set in one place.",
            inputs=[io.Image.Input("images", tooltip="The video the mask is for (only its size is used)."),
                    io.Combo.Input("region", options=list(REGIONS), default="top and bottom (outpaint)",
                                   tooltip="Bands to fill (outpainting, BIVDiff's default: top and bottom) or the "
                                           "centre to repaint (inpainting)."),
                    io.Float.Input("fraction", default=0.25, min=0.01, max=0.49, step=0.01,
                                   tooltip="Band width as a share of the height (or width); for the centre, the kept "
                                           "border on each side. BIVDiff uses 0.25.")],
            outputs=[io.Mask.Output(display_name="mask", tooltip="[1, H, W], used for every frame.")])

    @classmethod
    def execute(cls, images, region, fraction) -> io.NodeOutput:
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"VBRegionMask: images: expected an IMAGE batch, got shape {tuple(images.shape)}")
        try:
            mask = region_mask(1, images.shape[1], images.shape[2], REGIONS[region], fraction)
        except ValueError as e:
            raise ValueError(f"VBRegionMask: {e}") from None
        return io.NodeOutput(mask.to(mm.intermediate_device()))
