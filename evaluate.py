"""Evaluate diffusion models: ``python evaluate.py sample CKPT ...``, ``--pair A B``, ``--matrix A B C ...``.

See ``lightning_repro/evaluate.py`` for the commands, file formats and options.
"""

from lightning_repro.evaluate import main

if __name__ == "__main__":
    main()
