"""Published checkpoints as Denoisers: loaders that read other codebases' files as data (``diffusers``: pipeline folders)."""
