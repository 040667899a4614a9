"""``teachers.load_teacher``: any model spec as the frozen teacher of a distillation, with shape/class checks."""

import pytest
import torch

from lightning_repro.data import SubsetDataModule
from lightning_repro.teachers import load_teacher
from lightning_repro.theory import EmpiricalOptimalDenoiser


def test_optimal_teacher_is_the_optimal_denoiser_of_the_students_subset():
    data = {"source": "digits", "size": 8, "subset_seed": 0}
    t = load_teacher("optimal:", (1, 8, 8), 0, data=data)
    images = SubsetDataModule(**data).images
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7)
    want = EmpiricalOptimalDenoiser(images)(x, sigma)
    assert torch.allclose(t.denoiser(x, sigma).double(), want.double(), atol=1e-6)
    assert t.kernel.name == "edm" and t.provenance["size"] == 8 and len(t.provenance["sha256"]) == 64


def test_a_teacher_of_another_shape_or_class_count_is_one_sentence():
    data = {"source": "digits", "size": 8}
    with pytest.raises(ValueError, match=r"makes 1x8x8 images but the student's data are 3x8x8"):
        load_teacher("optimal:", (3, 8, 8), 0, data=data)
    with pytest.raises(ValueError, match=r"has 0 classes but the student's data have 10"):
        load_teacher("optimal:", (1, 8, 8), 10, data=data)
