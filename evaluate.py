"""Evaluate diffusion models: ``python evaluate.py sample CKPT ...``, ``--pair A B``, ``--matrix A B C ...``.

See the README (Sampling and evaluation) and ``lightning_repro/evaluation/``.
"""

from lightning_repro.evaluation import main

if __name__ == "__main__":
    main()
