"""``regression_teacher``: the loss regresses onto a teacher's D(x, sigma) instead of x0 (a diagnostic option)."""

import lightning as L
import pytest
import torch

from lightning_repro.checkpoints import CKPT_KEY, load_checkpoint
from lightning_repro.consistency import CTDiT
from lightning_repro.data import SubsetDataModule
from lightning_repro.kernels import get_kernel
from lightning_repro.losses import DenoisingLoss
from lightning_repro.module import DiT
from lightning_repro.theory import EmpiricalOptimalDenoiser

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = dict(image_shape=(1, 8, 8), patch_size=4, hidden_size=16, depth=1, num_heads=2)


def _draws(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.exp(torch.randn(n, generator=g)), torch.randn(n, 1, 8, 8, generator=g)


def test_the_target_replaces_x0_and_the_teacher_itself_has_zero_loss():
    images = SubsetDataModule("digits", size=16).images
    opt, kernel = EmpiricalOptimalDenoiser(images), get_kernel("edm")
    x0, (sigma, noise) = images[:6], _draws()
    x = x0 + sigma.view(-1, 1, 1, 1) * noise

    def student(x, s, labels=None):
        return 0.5 * x

    loss = DenoisingLoss(kernel, target=opt).weighted_error(student, x0, None, sigma, noise)
    weight = kernel.loss_weight(sigma.double()).float().view(-1, 1, 1, 1)
    want = (weight * (0.5 * x - opt(x, sigma).float()) ** 2).mean()
    assert torch.allclose(loss, want, rtol=1e-6)
    assert float(DenoisingLoss(kernel, target=opt).weighted_error(opt, x0, None, sigma, noise)) == 0.0
    assert float(DenoisingLoss(kernel).weighted_error(opt, x0, None, sigma, noise)) > 0.0  # x0 is not D*(x)


def _fit(module, tmp_path, steps=2):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SubsetDataModule("digits", size=16, batch_size=8, val_seeds=2))
    return trainer


def test_optimal_teacher_is_the_optimal_denoiser_of_the_training_subset_and_is_recorded(tmp_path):
    m = DiT(regression_teacher="optimal:", **TINY)
    trainer = _fit(m, tmp_path)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.3, 1.0, 2.0, 10.0])
    want = EmpiricalOptimalDenoiser(SubsetDataModule("digits", size=16).images)(x, sigma)
    assert torch.equal(m.loss.target(x, sigma), want)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    meta = load_checkpoint(tmp_path / "m.ckpt")[CKPT_KEY]
    assert meta["regression_teacher"] == "optimal:" and meta["hparams"]["regression_teacher"] == "optimal:"
    assert meta["regression_teacher_provenance"]["size"] == 16
    assert DiT(**TINY).loss.target is None  # the default: denoising score matching onto x0


def test_a_procedure_with_its_own_loss_refuses_it_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"^regression_teacher replaces the target of denoising score matching; "
                                         r"CTDiT trains with a loss of its own\.$"):
        _fit(CTDiT(regression_teacher="optimal:", **TINY), tmp_path)
