#!/usr/bin/env python3
"""Golden fixtures for the Rust schedulers in src/diffusion/schedulers/ (read by parity_tests.rs).

Why: dream-ood ports five diffusers schedulers and the official CompVis PLMS sampler to Rust; these files pin
them to the reference implementations, loop for loop.

Source:   diffusers==0.42.1 and torch==2.11.0 (CPU), numpy==2.4.6 (tools/requirements-fixtures.txt);
          the `ldm_plms` cases come from `ldm_plms_loop` below, a line-by-line transcription of CompVis
          stable-diffusion `ldm/models/diffusion/plms.py` (`make_schedule`, `plms_sampling`, `p_sample_plms`)
          and `ldm/modules/diffusionmodules/util.py` (`make_ddim_timesteps`, `make_ddim_sampling_parameters`)
          at commit 21f890f, with ddpm.py's float64 `register_schedule`.
Seed:     torch.manual_seed(0) for the one initial latent `latent`, shape [1, 4, 8, 8]; each loop starts
          from latent * init_noise_sigma (float32).
Model:    a closed-form dummy, eps(x, t)[i] = 0.1 * x[i] + 0.5 * sin(t / 100 + 0.1 * i) (i = flat index; the
          sine in float64, cast to float32; the rest float32), so Rust needs no torch.
Noise:    the stochastic samplers (Euler ancestral, DDIM eta > 0) get, at their k-th step (k from 0),
          z_k[i] = sin(12.9898 * (i + 1) + 78.233 * (k + 1)) * 1.5 in float64, cast to float32; injected
          through diffusers' `randn_tensor` (Euler ancestral) or `variance_noise` (DDIM).
Command:  make fixtures-venv && .deps/venv/bin/python tools/make_scheduler_fixtures.py
          (writes tests/fixtures/schedulers/loops.json, about 0.5 MB)
Tolerance: the Rust loops must match within |found - expected| <= atol + rtol * |expected| with
          atol = rtol = 1e-5 elementwise (float32 latents; diffusers' float32 torch scalar maths against
          Rust's f64 coefficients differ by ulps per step). Timesteps match exactly (float32), sigmas and
          alphas_cumprod within rtol 1e-6.
"""

import json
import math
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedulers" / "loops.json"
SHAPE = (1, 4, 8, 8)
NUMEL = int(np.prod(SHAPE))
IDX = np.arange(NUMEL, dtype=np.float64).reshape(SHAPE)

# The SD 1.x scheduler config (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as re-saved
# by recent diffusers: the keys every class reads). Rust's SchedulerConfig::default() is the same.
SD15 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
    prediction_type="epsilon",
)

CLASSES = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def model(x: torch.Tensor, t: float) -> torch.Tensor:
    wave = torch.from_numpy(0.5 * np.sin(t / 100.0 + 0.1 * IDX)).to(torch.float32)
    return 0.1 * x + wave


def noise(k: int) -> torch.Tensor:
    z = np.sin(12.9898 * (IDX + 1.0) + 78.233 * (k + 1)) * 1.5
    return torch.from_numpy(z).to(torch.float32)


def flat(x) -> list:
    return [float(v) for v in np.asarray(x, dtype=np.float32).reshape(-1)]


def initial_latent() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(SHAPE, dtype=torch.float32)


def snapshot_steps(n_calls: int) -> list:
    # The first calls cover the warm-up logic (PLMS' Heun step, DPM-Solver's first-order step).
    return sorted({0, 1, 2, n_calls // 2})


def diffusers_case(name: str, kind: str, overrides: dict, n: int, eta: float = 0.0) -> dict:
    config = {**SD15, **overrides}
    sched = CLASSES[kind].from_config(config)
    sched.set_timesteps(n)
    timesteps = [float(t) for t in sched.timesteps]
    x = initial_latent() * sched.init_noise_sigma
    case = {
        "name": name,
        "kind": kind,
        "config": {k: v for k, v in config.items() if v is not None},
        "eta": eta,
        "num_inference_steps": n,
        "timesteps": timesteps,
        "init_noise_sigma": float(sched.init_noise_sigma),
        "sigmas": [float(s) for s in sched.sigmas] if hasattr(sched, "sigmas") and kind != "pndm" else None,
        "snapshots": {},
    }
    # add_noise at a middle timestep, on a fresh copy (Euler's add_noise reads its step index).
    probe = CLASSES[kind].from_config(config)
    probe.set_timesteps(n)
    t_mid = probe.timesteps[len(probe.timesteps) // 2]
    x0 = initial_latent() * 0.5
    case["add_noise"] = {
        "timestep": float(t_mid),
        "values": flat(probe.add_noise(x0, noise(99), torch.tensor([t_mid]))),
    }
    keep = snapshot_steps(len(timesteps))
    drawn = {"k": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        z = noise(drawn["k"]).reshape(shape)
        drawn["k"] += 1
        return z.to(dtype or torch.float32)

    scheduling_euler_ancestral_discrete.randn_tensor = fake_randn
    for k, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        if k == 0:
            case["scale_model_input"] = {"timestep": float(t), "values": flat(inp)}
        eps = model(inp, float(t))
        if kind == "ddim":
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise(k) if eta > 0 else None).prev_sample
        else:
            x = sched.step(eps, t, x).prev_sample
        if k in keep:
            case["snapshots"][str(k)] = flat(x)
    case["final"] = flat(x)
    return case


# ----- CompVis ldm PLMS, transcribed (see the header) ------------------------------------------------------


def ldm_alphas_cumprod(num_train: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
    # util.py make_beta_schedule("linear"): torch.linspace(float64) ** 2; ddpm.py: np.cumprod in float64,
    # then registered as float32 tensors.
    betas = (torch.linspace(linear_start**0.5, linear_end**0.5, num_train, dtype=torch.float64) ** 2).numpy()
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    return torch.tensor(alphas_cumprod, dtype=torch.float32)


def ldm_plms_loop(n: int) -> dict:
    alphacums = ldm_alphas_cumprod()
    # make_ddim_timesteps("uniform"): c = T // n; range(0, T, c) + 1
    c = 1000 // n
    ddim_timesteps = np.asarray(list(range(0, 1000, c))) + 1
    # make_ddim_sampling_parameters(eta=0)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sqrt_one_minus_alphas = np.sqrt((1.0 - alphas).numpy())  # ldm: np.sqrt(1. - ddim_alphas)
    time_range = np.flip(ddim_timesteps)
    total_steps = ddim_timesteps.shape[0]
    x = initial_latent()
    calls = []
    old_eps = []
    snaps = {}
    for i, step in enumerate(time_range):
        index = total_steps - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]

        def get_x_prev_and_pred_x0(e_t, index, x=x):
            a_t = torch.full((1, 1, 1, 1), float(alphas[index]))
            a_prev = torch.full((1, 1, 1, 1), float(alphas_prev[index]))
            sigma_t = torch.full((1, 1, 1, 1), 0.0)
            sqrt_one_minus_at = torch.full((1, 1, 1, 1), float(sqrt_one_minus_alphas[index]))
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
            return a_prev.sqrt() * pred_x0 + dir_xt

        e_t = model(x, float(step))
        calls.append(float(step))
        if len(old_eps) == 0:
            x_prev = get_x_prev_and_pred_x0(e_t, index)
            snaps[str(len(calls) - 1)] = flat(x_prev)
            e_t_next = model(x_prev, float(t_next))
            calls.append(float(t_next))
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = get_x_prev_and_pred_x0(e_t_prime, index)
        snaps[str(len(calls) - 1)] = flat(x)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    keep = snapshot_steps(len(calls))
    return {
        "name": f"ldm_plms_{n}",
        "kind": "plms",
        "config": dict(SD15),
        "eta": 0.0,
        "num_inference_steps": n,
        "timesteps": calls,
        "init_noise_sigma": 1.0,
        "sigmas": None,
        "snapshots": {k: v for k, v in snaps.items() if int(k) in keep},
        "final": flat(x),
        "alphas_cumprod": None,
    }


def main() -> None:
    v_pred = dict(prediction_type="v_prediction", steps_offset=1)
    trailing = dict(timestep_spacing="trailing")
    cases = [
        diffusers_case("pndm_sd15_50", "pndm", {}, 50),
        diffusers_case("pndm_sd15_20", "pndm", {}, 20),
        diffusers_case("pndm_sd15_30", "pndm", {}, 30),
        diffusers_case("pndm_v_trailing_20", "pndm", {**v_pred, **trailing}, 20),
        diffusers_case("ddim_sd15_50", "ddim", {}, 50),
        diffusers_case("ddim_sd15_20", "ddim", {}, 20),
        diffusers_case("ddim_alpha_one_trailing_20", "ddim", {"set_alpha_to_one": True, **trailing}, 20),
        diffusers_case("ddim_v_20", "ddim", v_pred, 20),
        diffusers_case("ddim_eta_0.5_20", "ddim", {}, 20, eta=0.5),
        diffusers_case("euler_sd15_50", "euler", {}, 50),
        diffusers_case("euler_sd15_20", "euler", {}, 20),
        diffusers_case("euler_leading_20", "euler", {"timestep_spacing": "leading"}, 20),
        diffusers_case("euler_v_trailing_20", "euler", {**v_pred, **trailing}, 20),
        diffusers_case("euler_ancestral_sd15_20", "euler_ancestral", {}, 20),
        diffusers_case("euler_ancestral_leading_50", "euler_ancestral", {"timestep_spacing": "leading"}, 50),
        diffusers_case("dpmpp_2m_sd15_20", "dpmpp_2m", {}, 20),
        diffusers_case("dpmpp_2m_sd15_50", "dpmpp_2m", {}, 50),
        diffusers_case("dpmpp_2m_v_trailing_20", "dpmpp_2m", {**v_pred, **trailing}, 20),
        diffusers_case("dpmpp_2m_leading_10", "dpmpp_2m", {"timestep_spacing": "leading"}, 10),
        diffusers_case("ddim_cosine_linear_10", "ddim", {"beta_schedule": "squaredcos_cap_v2"}, 10),
        diffusers_case("pndm_linear_linspace_10", "pndm", {"beta_schedule": "linear", "beta_start": 0.0001,
                                                           "beta_end": 0.02, "timestep_spacing": "linspace"}, 10),
        ldm_plms_loop(50),
        ldm_plms_loop(30),
    ]
    tables = {}
    for label, cfg in [
        ("scaled_linear", SD15),
        ("linear", {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("squaredcos_cap_v2", {**SD15, "beta_schedule": "squaredcos_cap_v2"}),
    ]:
        tables[label] = {
            "config": {k: v for k, v in cfg.items() if v is not None},
            "alphas_cumprod": [float(a) for a in DDIMScheduler.from_config(cfg).alphas_cumprod],
        }
    tables["ldm_scaled_linear"] = {
        "config": dict(SD15),
        "alphas_cumprod": [float(a) for a in ldm_alphas_cumprod()],
    }
    doc = {
        "source": f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}; "
        "tools/make_scheduler_fixtures.py",
        "shape": list(SHAPE),
        "latent": flat(initial_latent()),
        "atol": 1e-5,
        "rtol": 1e-5,
        "alphas_cumprod": tables,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    # float32 values need 9 significant digits; shorten Python's 17-digit reprs of them.
    text = _shorten_floats(text)
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({len(text) / 1e6:.2f} MB, {len(cases)} cases)")


def _shorten_floats(text: str) -> str:
    import re

    def repl(m: re.Match) -> str:
        v = float(m.group(0))
        if v == 0 or not math.isfinite(v):
            return m.group(0)
        s = f"{v:.9g}"
        return s if float(np.float32(float(s))) == float(np.float32(v)) else m.group(0)

    return re.sub(r"-?\d+\.\d+(?:[eE][-+]?\d+)?|-?\d+[eE][-+]?\d+", repl, text)


if __name__ == "__main__":
    main()
