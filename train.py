"""Train a diffusion model: ``python train.py fit --config configs/train/<name>.yaml``."""

from lightning_repro.cli import main

if __name__ == "__main__":
    main()
