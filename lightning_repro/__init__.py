"""lightning_repro."""
