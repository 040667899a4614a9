"""The training step's cheap paths (issue 18) do what the plain ones did: the EMA update found once still updates the
tensors a module holds now, multi-epoch batches index ``perm_{p // N}[p % N]``, the optimiser is the for-loop
AdamW's equal, and logging only on logging steps still leaves the last step's loss in ``callback_metrics``."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_repro.data import SubsetDataModule
from lightning_repro.data.datamodule import InfiniteBatchStream
from lightning_repro.module import DDPMpp, DiT

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_dit(**kw):
    return DiT(kernel="edm", image_shape=(1, 8, 8), patch_size=4, hidden_size=16, depth=1, num_heads=2, **kw)


def test_ema_update_follows_tensors_replaced_after_the_first_update():
    m = DDPMpp(kernel="edm", image_shape=(1, 8, 8), model_channels=8, channel_mult=[1, 1], num_blocks=1,
               attn_resolutions=[])
    assert list(m.model.buffers())  # the network has buffers: they are copied too
    m.update_ema(0.5)  # finds the slots
    new = {k: torch.full_like(v, 2.0) for k, v in m.model.state_dict().items()}
    m.model.load_state_dict(new, assign=True)  # every tensor replaced by a new one
    before = {k: v.clone() for k, v in m.ema.state_dict().items()}
    m.update_ema(0.75)
    names = dict(m.model.named_parameters())
    for k, v in m.ema.state_dict().items():
        want = 0.75 * before[k] + 0.25 * 2.0 if k in names else torch.full_like(v, 2.0)
        assert torch.allclose(v, want), k


def test_multi_epoch_batches_take_position_p_from_the_permutation_of_epoch_p_div_n():
    n, b = 5, 12  # every batch spans three or four epochs
    s = InfiniteBatchStream(torch.zeros(n, 1, 2, 2), torch.zeros(n), b, seed=3)
    for step in (0, 1, 7):
        pos = s.positions(step)
        want = torch.stack([InfiniteBatchStream(torch.zeros(n, 1, 2, 2), torch.zeros(n), b, seed=3)._perm_of(int(p) // n)
                            [int(p) % n] for p in pos])
        assert torch.equal(s.indices(step), want)


def test_adamw_off_cuda_gives_the_for_loop_adamw_weights():
    weights = []
    for opt_kw in ({"foreach": False}, None):  # None: the module's own optimiser
        torch.manual_seed(0)
        m = tiny_dit(weight_decay=0.01)
        opt = torch.optim.AdamW(m.model.parameters(), lr=2e-4, weight_decay=0.01, **opt_kw) if opt_kw \
            else m.configure_optimizers()["optimizer"]
        x0 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        for k in range(5):
            loss = m.loss(m.denoise, x0, None, m.step_generator(k, "cpu"))
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append([p.detach().clone() for p in m.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


class _Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_loss_is_logged_on_logging_steps_and_the_last_step(tmp_path):
    torch.manual_seed(0)
    m, seen = tiny_dit(), _Losses()
    dm = SubsetDataModule(source="digits", size=32, batch_size=8, val_seeds=0)
    trainer = L.Trainer(max_steps=7, log_every_n_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[seen], default_root_dir=str(tmp_path))
    assert m.logs_this_step()  # outside a trainer: always
    trainer.fit(m, datamodule=dm)
    assert len(seen.losses) == 7 and float(trainer.callback_metrics["train/loss"]) == seen.losses[-1]
    assert 0 < float(trainer.callback_metrics["train/ema_beta"]) < 1


def test_compile_builds_a_static_shape_forward_in_both_module_families(monkeypatch):
    """``compile: true`` compiles the training network with ``dynamic=False`` (a second batch size recompiles
    statically; a symbolic batch dimension fails in inductor's CPU lowering of the U-Nets, torch 2.14) — in the
    diffusion modules and the consistency ones; ``compile: false`` keeps the network itself."""
    from lightning_repro.consistency import CTDiT

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append((model, kw)) or model)
    kw = dict(image_shape=(1, 8, 8), patch_size=4, hidden_size=16, depth=1, num_heads=2)
    for make in (lambda c: DiT(kernel="edm", compile=c, **kw), lambda c: CTDiT(compile=c, **kw)):
        m = make(False)
        assert m._forward is m.model and not calls
        m = make(True)
        assert calls.pop() == (m.model, {"dynamic": False})
