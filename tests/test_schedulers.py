"""The numpy schedulers step exactly like diffusers' (within 1e-5) and refuse settings they do not port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from core.errors import InvalidModel, InvalidParameters
from core.params import SCHEDULERS
from core.schedulers import make_scheduler
from export.reference import numpy_noise

# timbrooks/instruct-pix2pix's scheduler_config.json (Stable Diffusion 1.5's betas), with its spacing made explicit.
IP2P_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.15.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
DIFFUSERS = {name: getattr(diffusers, name) for name in SCHEDULERS.values()}  # each port against its class
TOL = {"atol": 1e-5, "rtol": 1e-5}
SPACINGS = ["leading", "linspace", "trailing"]
PREDICTIONS = ["epsilon", "v_prediction"]
STEPS = [1, 2, 5, 20]
# Zero terminal SNR (Lin et al. 2023) as it is used: v-prediction, sampling from the last (pure noise) timestep.
ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
# Its rescale divides neighbouring alphas_cumprod, so an ulp where torch's CPU sqrt rounds differently from numpy's
# becomes a few 1e-6 of the smallest alphas_cumprod; and the first step takes a sample of scale 4096 (the first sigma)
# down to scale 1, where one float32 ulp of the start is 5e-4.
ZERO_SNR_TOL = {"atol": 2e-3, "rtol": 1e-4}


def fake_model(sample: np.ndarray, step_index: int) -> np.ndarray:
    """A deterministic stand-in for the UNet: a fixed function of the scaled sample and the step."""
    return (0.3 * sample + 0.1 * np.sin(step_index + sample)).astype(np.float32)


def assert_matches_diffusers(name: str, steps: int, config: dict) -> None:
    """Run a full denoising loop on diffusers' scheduler and on the port; compare every intermediate."""
    tol = ZERO_SNR_TOL if config.get("rescale_betas_zero_snr") else TOL
    theirs = DIFFUSERS[SCHEDULERS[name]].from_config(config)
    mine = make_scheduler(config, name)
    theirs.set_timesteps(steps)
    mine.set_timesteps(steps)
    assert mine.timesteps.dtype == np.float32
    # Exact for integer timesteps; Karras ones derive from sigmas, and torch's CPU sqrt can differ by an ulp.
    np.testing.assert_allclose(mine.timesteps, theirs.timesteps.numpy().astype(np.float32), rtol=1e-6, atol=0)
    np.testing.assert_allclose(mine.init_noise_sigma, float(theirs.init_noise_sigma), rtol=1e-6)

    # Both sides draw per-step noise (ancestral, LCM) from identically seeded numpy generators.
    their_rng, my_rng = np.random.default_rng(7), np.random.default_rng(7)
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    mine_x = noise * np.float32(mine.init_noise_sigma)
    their_x = torch.from_numpy(mine_x.copy())
    for i, t in enumerate(theirs.timesteps):
        my_in = mine.scale_model_input(mine_x, i)
        their_in = theirs.scale_model_input(their_x, t).numpy()
        np.testing.assert_allclose(my_in, their_in, **tol, err_msg=f"scale_model_input at step {i}")
        mine_x = mine.step(fake_model(my_in, i), i, mine_x, my_rng)
        with numpy_noise(their_rng):
            their_x = theirs.step(torch.from_numpy(fake_model(their_in, i)), t, their_x).prev_sample
        assert mine_x.dtype == np.float32
        np.testing.assert_allclose(mine_x, their_x.numpy(), **tol, err_msg=f"prev_sample at step {i}")
    assert my_rng.random() == their_rng.random()  # as many draws on both sides


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ["euler-ancestral", "euler", "ddim"])
def test_single_step_schedulers_match_diffusers(name, spacing, prediction_type, steps):
    config = {**IP2P_CONFIG, "timestep_spacing": spacing, "prediction_type": prediction_type}
    assert_matches_diffusers(name, steps, config)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_dpm_multistep_matches_diffusers(solver_order, solver_type, spacing, prediction_type, steps):
    config = {
        **IP2P_CONFIG,
        "solver_order": solver_order,
        "solver_type": solver_type,
        "timestep_spacing": spacing,
        "prediction_type": prediction_type,
    }
    assert_matches_diffusers("dpm-multistep", steps, config)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("prediction_type", [*PREDICTIONS, "sample"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_lcm_matches_diffusers(spacing, prediction_type, steps):
    # LCM takes its steps from the distillation schedule: diffusers reads no timestep_spacing, nor does the port.
    config = {**IP2P_CONFIG, "timestep_spacing": spacing, "prediction_type": prediction_type}
    assert_matches_diffusers("lcm", steps, config)


@pytest.mark.parametrize("steps", [5, 20])
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("euler", {"use_karras_sigmas": True}),
        ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
        ("euler", {"final_sigmas_type": "sigma_min"}),
        ("euler", {"prediction_type": "sample"}),
        ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("euler-ancestral", {"beta_schedule": "squaredcos_cap_v2"}),
        ("ddim", {"clip_sample": True, "set_alpha_to_one": True}),
        ("ddim", {"prediction_type": "sample"}),
        ("ddim", {"trained_betas": np.linspace(0.001, 0.02, 1000).tolist()}),
        ("dpm-multistep", {"use_karras_sigmas": True}),
        ("dpm-multistep", {"final_sigmas_type": "sigma_min"}),
        ("dpm-multistep", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
        ("dpm-multistep", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
        ("dpm-multistep", {"prediction_type": "sample"}),
        ("lcm", {"clip_sample": True, "clip_sample_range": 0.5}),
        ("lcm", {"original_inference_steps": 30}),  # a stride (33) that does not divide the 1000 training steps
        ("lcm", {"timestep_scaling": 0.05}),  # the sample itself (c_skip) weighs in at every step, not just the last
        ("lcm", {"set_alpha_to_one": True, "steps_offset": 0}),  # keys diffusers' LCMScheduler takes and ignores
        *((name, ZERO_SNR) for name in ("euler", "euler-ancestral", "ddim", "dpm-multistep", "lcm")),
        ("euler", {**ZERO_SNR, "timestep_spacing": "leading"}),
    ],
)
def test_other_supported_settings_match_diffusers(name, overrides, steps):
    assert_matches_diffusers(name, steps, {**IP2P_CONFIG, **overrides})


@pytest.mark.parametrize("name", SCHEDULERS)
def test_keys_missing_from_the_config_take_each_class_own_defaults(name):
    # No timestep_spacing, clip_sample or set_alpha_to_one: each class falls back to its own defaults, as in diffusers.
    shared = ("_class_name", "beta_end", "beta_schedule", "beta_start", "steps_offset")
    config = {key: IP2P_CONFIG[key] for key in shared}
    assert_matches_diffusers(name, 10, config)


def test_no_name_picks_the_configs_own_class():
    for class_name in SCHEDULERS.values():
        assert type(make_scheduler({**IP2P_CONFIG, "_class_name": class_name})).__name__ == class_name


def test_every_cli_scheduler_name_has_a_port():
    for name, class_name in SCHEDULERS.items():
        assert type(make_scheduler(IP2P_CONFIG, name)).__name__ == class_name


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("euler", "use_exponential_sigmas", True),
        ("euler", "interpolation_type", "log_linear"),
        ("ddim", "thresholding", True),
        ("dpm-multistep", "thresholding", True),
        ("dpm-multistep", "algorithm_type", "sde-dpmsolver++"),
        ("dpm-multistep", "use_lu_lambdas", True),
        ("dpm-multistep", "final_sigmas_type", "denoised"),
        ("lcm", "thresholding", True),
        ("lcm", "original_inference_steps", 2000),
        ("euler", "timestep_spacing", "quadratic"),
        ("ddim", "beta_schedule", "sqrt"),
    ],
)
def test_an_unported_setting_is_refused_naming_its_key(name, key, value):
    with pytest.raises(InvalidModel, match=key):
        make_scheduler({**IP2P_CONFIG, key: value}, name)


def test_lcm_refuses_more_steps_than_the_schedule_it_was_distilled_on():
    scheduler = make_scheduler({**IP2P_CONFIG, "original_inference_steps": 8}, "lcm")
    scheduler.set_timesteps(8)
    with pytest.raises(InvalidParameters, match="at most 8 steps"):
        scheduler.set_timesteps(9)


def test_a_setting_the_class_does_not_take_is_ignored():
    # Karras sigmas are an EulerDiscrete option; diffusers' ancestral Euler has none and ignores the key.
    plain = make_scheduler(IP2P_CONFIG, "euler-ancestral")
    karras = make_scheduler({**IP2P_CONFIG, "use_karras_sigmas": True, "thresholding": True}, "euler-ancestral")
    plain.set_timesteps(5)
    karras.set_timesteps(5)
    np.testing.assert_array_equal(plain.timesteps, karras.timesteps)


def test_an_unknown_class_is_refused_naming_the_supported_ones():
    with pytest.raises(InvalidModel, match=r"PNDMScheduler.*EulerAncestralDiscreteScheduler"):
        make_scheduler({**IP2P_CONFIG, "_class_name": "PNDMScheduler"})


def test_an_unknown_scheduler_name_is_a_parameter_error():
    with pytest.raises(InvalidParameters, match="plms"):
        make_scheduler(IP2P_CONFIG, "plms")


def test_importing_the_schedulers_loads_neither_torch_nor_diffusers():
    code = "import sys, core.schedulers; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
