from framework.modules.video_diffusion import VideoDiffusion

__all__ = ["VideoDiffusion"]
