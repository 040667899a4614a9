"""diffusers: model specs: the suite's samplers on a pipeline's own sigma grid equal diffusers' schedulers.

Pipelines are tiny random ones written by the test with ``save_pretrained`` (offline).
"""

import numpy as np
import pytest
import torch

from lightning_repro.data.sources import float_to_uint8
from lightning_repro.evaluation import SamplingOptions, generate_samples, resolve_model
from lightning_repro.published.tiny_pipelines import SD_V1_SCHEDULER, write_sd_pipeline, write_unet_pipeline
from lightning_repro.sampling import SolverConfig, sample_seeds, seed_noise
from lightning_repro.sampling.solvers import get_sampler

pytestmark = pytest.mark.filterwarnings("ignore")
SEEDS = [0, 1]
CPU = torch.device("cpu")


def _diffusers_loop(unet, scheduler, z, steps, **unet_kw):
    """The pipelines' loop: ``x_T = init_noise_sigma * z``, then ``scheduler.step`` (eta = 0) at its timesteps."""
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t, **unet_kw).sample
            x = scheduler.step(out, t, x).prev_sample
    return x


def _suite(ref, steps, sampler="euler", labels=None, guidance=1.0, **opts):
    """``sample_seeds`` on the pipeline's native grid: decoded and clamped to [-1, 1]."""
    config = SolverConfig(sampler, steps, "native", guidance=guidance, opts=opts)
    return sample_seeds(ref.denoiser(CPU), ref.kernel(), SEEDS, ref.sample_shape, config, labels=labels,
                        device=CPU, decode=ref.decoder(CPU))


def _unclamped(ref, steps, sampler="euler", **opts):
    """The same run before the clamp: ``x_T = start_scale * z``, the solver, the decoder (VP variable)."""
    kernel = ref.kernel()
    sigmas = kernel.sigmas(steps)
    x_T = kernel.start_scale(sigmas) * seed_noise(SEEDS, ref.sample_shape)
    with torch.no_grad():
        x = get_sampler(sampler)(ref.denoiser(CPU), x_T, sigmas, **opts)
        return ref.decoder(CPU)(x, float(sigmas[-1]))


def _close(got, want, tol):
    """``max |got - want| <= tol`` relative to the output's scale (a random network's trajectory leaves [-1, 1], to
    ~100-500: float32 round-off there is ~1e-4 absolute, ~1e-6 relative; a wrong step order is ~1e-3 relative)."""
    return (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("final_one", [True, False])
def test_euler_on_the_pipeline_grid_is_ddim(tmp_path, prediction, final_one):
    from diffusers import DDIMScheduler, UNet2DModel

    kw = dict(clip_sample=False, prediction_type=prediction, set_alpha_to_one=final_one, steps_offset=int(not final_one))
    write_unet_pipeline(tmp_path / "pipe", DDIMScheduler(**kw))
    ref = resolve_model(f"diffusers:{tmp_path / 'pipe'}")
    unet = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    want = _diffusers_loop(unet, DDIMScheduler(**kw), seed_noise(SEEDS, (3, 8, 8)), 7)
    assert ref.image_shape == (3, 8, 8) and ref.num_classes == 0
    assert _close(_unclamped(ref, 7), want, 1e-5)
    assert (_suite(ref, 7) - want.clamp(-1, 1)).abs().max().item() <= 1e-4


def test_dpmpp_on_the_pipeline_grid_is_dpm_solver_2m(tmp_path):
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    write_unet_pipeline(tmp_path / "pipe", DPMSolverMultistepScheduler())
    ref = resolve_model(f"diffusers:{tmp_path / 'pipe'}")
    unet = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    z = seed_noise(SEEDS, (3, 8, 8))
    want = _diffusers_loop(unet, DPMSolverMultistepScheduler(), z, 16)
    assert _close(_unclamped(ref, 16, "dpmpp"), want, 1e-5)
    assert (_suite(ref, 16, "dpmpp") - want.clamp(-1, 1)).abs().max().item() <= 1e-4
    # below 15 steps diffusers lowers only the step into sigma = 0, i.e. the suite's lower_order_final=False
    want = _diffusers_loop(unet, DPMSolverMultistepScheduler(), z, 6)
    assert _close(_unclamped(ref, 6, "dpmpp", lower_order_final=False), want, 1e-5)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [8, 10])
def test_dpmpp_below_15_steps_is_the_scheduler_with_lower_order_final_diffusers(tmp_path, order, steps):
    """diffusers counts the step into sigma = 0 among the final steps, dpm-solver (the suite's default) does not."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    write_unet_pipeline(tmp_path / "pipe", DPMSolverMultistepScheduler(solver_order=order))
    ref = resolve_model(f"diffusers:{tmp_path / 'pipe'}")
    unet = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    want = _diffusers_loop(unet, DPMSolverMultistepScheduler(solver_order=order), seed_noise(SEEDS, (3, 8, 8)), steps)
    opts = {"order": order, "legacy_3m": True}  # diffusers' 3M coefficient (see sample_dpmpp)
    assert _close(_unclamped(ref, steps, "dpmpp", lower_order_final="diffusers", **opts), want, 1e-5)
    assert (_suite(ref, steps, "dpmpp", lower_order_final="diffusers", **opts) - want.clamp(-1, 1)).abs().max() <= 1e-4
    # the other rules differ (measured relative deviations: dpm-solver 3.0e-5 at 8 steps of 2M, 3.1e-4 / 5.6e-5 at
    # 8 / 10 of 3M; off, which equals diffusers for 2M, 2.2e-4 / 3.3e-5 for 3M; diffusers 3-5e-7)
    if order == 3 or steps == 8:
        assert not _close(_unclamped(ref, steps, "dpmpp", **opts), want, 1e-5)
    if order == 3:
        assert not _close(_unclamped(ref, steps, "dpmpp", lower_order_final="off", **opts), want, 1e-5)
    # evaluate.py's --lower-order-final diffusers: the same samples
    options = SamplingOptions(sampler="dpmpp", steps=steps, grid="native", lower_order_final="diffusers",
                              progress=False, device="cpu")
    if order == 2:
        s = generate_samples(ref, SEEDS, tmp_path / "shards", options, log=lambda m: None)
        x = _suite(ref, steps, "dpmpp", lower_order_final="diffusers")
        assert np.array_equal(s.images, float_to_uint8(x)) and s.provenance["lower_order_final"] == "diffusers"
        assert options.cache_tag == f"dpmpp{steps}_native_lof-diffusers"


def test_stable_diffusion_from_a_prompt_equals_the_pipeline(tmp_path):
    pipe = write_sd_pipeline(tmp_path / "sd")
    prompt = "a photograph of an astronaut"
    ref = resolve_model(f"diffusers:{tmp_path / 'sd'}?prompt={prompt}")
    assert ref.image_shape == (3, 16, 16) and ref.sample_shape == (4, 8, 8) and ref.num_classes == 1
    z = seed_noise(SEEDS, (4, 8, 8))
    with torch.no_grad():
        want = pipe([prompt] * 2, num_inference_steps=5, guidance_scale=3.0, eta=0.0, latents=z, output_type="pt")
    want = want.images * 2 - 1
    got = _suite(ref, 5, labels=[0, 0], guidance=3.0)
    assert got.shape == want.shape and want.std() > 0.05  # not a saturated or constant image
    assert (got - want).abs().max().item() <= 1e-3
    assert pipe.scheduler.config.set_alpha_to_one is SD_V1_SCHEDULER["set_alpha_to_one"]


def test_generate_samples_of_a_pipeline_spec(tmp_path):
    """The evaluation path (shards) samples the same images, uint8-rounded."""
    from diffusers import DDIMScheduler

    write_unet_pipeline(tmp_path / "pipe", DDIMScheduler(clip_sample=False))
    ref = resolve_model(f"diffusers:{tmp_path / 'pipe'}")
    s = generate_samples(ref, SEEDS, tmp_path / "out", SamplingOptions("euler", 4, device="cpu", progress=False),
                         log=lambda _: None)
    want = ((_suite(ref, 4) + 1) * 127.5).permute(0, 2, 3, 1)
    assert s.images.shape == (2, 8, 8, 3)
    assert (torch.from_numpy(s.images).float() - want).abs().max().item() <= 1.0
    assert s.provenance["kernel"]["name"] == "diffusers"


def test_text_pipeline_without_prompt_is_one_sentence(tmp_path):
    write_sd_pipeline(tmp_path / "sd")
    with pytest.raises(ValueError) as err:
        resolve_model(f"diffusers:{tmp_path / 'sd'}")
    assert str(err.value) == (
        f"diffusers:{tmp_path / 'sd'} is a text-to-image pipeline; give its prompt in the spec, e.g. "
        f"'diffusers:{tmp_path / 'sd'}?prompt=a photograph of an astronaut riding a horse'."
    )


def test_hub_id_offline_names_the_download(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError) as err:
        resolve_model("diffusers:CompVis/stable-diffusion-v1-4@main?prompt=a horse")
    assert str(err.value) == (
        "CompVis/stable-diffusion-v1-4 is not a local folder and could not be downloaded from the Hugging Face Hub "
        "(offline?): run `huggingface-cli download CompVis/stable-diffusion-v1-4 --revision main --local-dir DIR` on "
        "a machine with network, copy DIR here and pass diffusers:DIR."
    )


def test_folder_without_unet_is_one_sentence(tmp_path):
    with pytest.raises(ValueError) as err:
        resolve_model(f"diffusers:{tmp_path}")
    assert str(err.value) == (
        f"diffusers:{tmp_path}: {tmp_path} holds no unet/config.json; expected a diffusers pipeline folder "
        "(unet/, scheduler/)."
    )


def test_stored_samples_of_a_pipeline_read_back_with_their_kernel(tmp_path):
    from diffusers import DDIMScheduler

    from lightning_repro.kernels import get_kernel
    from lightning_repro.published.diffusers import DiffusersKernel

    write_unet_pipeline(tmp_path / "pipe", DDIMScheduler(clip_sample=False))
    ref = resolve_model(f"diffusers:{tmp_path / 'pipe'}")
    options = SamplingOptions("euler", 3, device="cpu", progress=False)
    made = ref.samples_at(SEEDS, tmp_path / "out", options, log=lambda _: None)
    stored = resolve_model(str(made.files[0]))
    assert stored.kind == "samples" and (stored.stored.images == made.images).all()
    kernel = stored.kernel()
    assert isinstance(kernel, DiffusersKernel) and kernel.config() == ref.kernel().config()
    assert torch.equal(kernel.sigmas(3), get_kernel("diffusers", **ref.kernel_spec["kwargs"]).sigmas(3))
    assert ref.info["ignored"] == [] and ref.sha256 == resolve_model(f"diffusers:{tmp_path / 'pipe'}").sha256


@pytest.mark.parametrize("suffix, message", [
    ("?steps=4", "'diffusers:{p}?steps=4': the only option is ?prompt=TEXT, got ?'steps=4'."),
    ("?prompt=a horse", "diffusers:{p}?prompt=a horse: its UNet2DModel takes no text, so ?prompt= does not apply."),
    ("@main", "diffusers:{p}@main: a revision applies to Hub ids, not to folders."),
])
def test_bad_pipeline_specs_are_one_sentence(tmp_path, suffix, message):
    from diffusers import DDIMScheduler

    p = write_unet_pipeline(tmp_path / "pipe", DDIMScheduler())
    with pytest.raises(ValueError) as err:
        resolve_model(f"diffusers:{p}{suffix}")
    assert str(err.value) == message.format(p=p)


def test_sigma_schedule_options_of_the_scheduler_are_refused():
    from lightning_repro.published.diffusers import DiffusersKernel

    with pytest.raises(ValueError) as err:
        DiffusersKernel({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    assert str(err.value) == (
        "the scheduler config sets use_karras_sigmas; the suite's grid follows the scheduler's timestep spacing only, "
        "so drop that option and choose the sigma grid with --grid (e.g. --grid karras)."
    )


def test_one_step_consistency_pipeline_is_one_euler_step(tmp_path):
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    write_unet_pipeline(tmp_path / "cm", CMStochasticIterativeScheduler())
    pipe = ConsistencyModelPipeline(UNet2DModel.from_pretrained(tmp_path / "cm" / "unet"),
                                    CMStochasticIterativeScheduler())
    ref = resolve_model(f"diffusers:{tmp_path / 'cm'}")
    assert ref.kernel_spec["name"] == "edm" and ref.kernel().sigmas(1).tolist() == [80.0, 0.0]
    z = seed_noise(SEEDS, (3, 8, 8))
    with torch.no_grad():
        want = pipe(batch_size=2, num_inference_steps=1, latents=z, output_type="pt").images * 2 - 1
    got = _suite(ref, 1)
    assert want.shape == got.shape and want.std() > 0.05
    assert (got - want).abs().max().item() <= 1e-4


def test_dit_pipeline_with_guidance_equals_dit_pipeline(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler
    from diffusers.pipelines.dit import pipeline_dit

    from lightning_repro.published.tiny_pipelines import write_dit_pipeline

    pipe = write_dit_pipeline(tmp_path / "dit", DDIMScheduler(clip_sample=False))
    ref = resolve_model(f"diffusers:{tmp_path / 'dit'}")
    assert ref.num_classes == 1000 and ref.sample_shape == (4, 4, 4) and ref.image_shape == (3, 8, 8)
    z = seed_noise(SEEDS, (4, 4, 4))
    monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda shape, **kw: z.clone())  # the pipeline's latents = z
    with torch.no_grad():
        want = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=5, output_type="pt").images * 2 - 1
    got = _suite(ref, 5, labels=[3, 7], guidance=4.0)
    assert want.shape == got.shape and want.std() > 0.05
    assert (got - want).abs().max().item() <= 1e-4
