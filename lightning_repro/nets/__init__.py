"""Plain denoiser networks (no diffusion logic, no Lightning): DDPM U-Net, DDPM++ U-Net, U-ViT, DiT."""
