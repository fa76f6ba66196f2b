"""IMAGE <-> LATENT with an image model's VAE, in frame chunks (OOM back-off in core)."""
from __future__ import annotations

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
