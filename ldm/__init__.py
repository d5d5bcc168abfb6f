"""ldm: latent diffusion, readable and exact. `LatentDiffusionPipeline.from_pretrained(path)(prompt).images`."""

__version__ = "0.1.0"

from ldm.pipeline import LatentDiffusionPipeline, PipelineOutput  # noqa: E402
from ldm.editing import ImageToImagePipeline, InpaintPipeline, InstructPix2PixPipeline  # noqa: E402

__all__ = ["LatentDiffusionPipeline", "PipelineOutput", "ImageToImagePipeline", "InpaintPipeline",
           "InstructPix2PixPipeline", "__version__"]
