#!/usr/bin/env python3
"""Golden values for the training code (src/nn/optim.rs, src/latent/loss.rs, src/detector/loss.rs), computed by
PyTorch 2.11.

Writes tests/fixtures/training/training.safetensors with:

* `optim.*`: torch.optim.SGD(momentum=0.9, nesterov=True, weight_decay=5e-4) with LambdaLR(cosine_annealing)
  stepped after every optimiser step, lr0 = 0.1, to 1e-6 over S = 7 steps (SPEC §1.5), on two parameters
  `a` [3, 4] and `b` [4] with the loss L_s = sum(sin(a) * (s + 1)) + sum(b^2 * cos(s)) at step s.
  `optim.init.a|b` the start, `optim.step{s}.a|b` after step s (0-based).
* `latent.*`: the stage-1 loss CE(cos(f, T) / tau, y), tau = 0.1 (SPEC §1.3, the official repeat-based
  cosine with eps 1e-8): inputs `latent.features` [6, 5], `latent.tokens` [4, 5], `latent.labels` [6];
  outputs `latent.loss` [] and `latent.grad` [6, 5] (d loss / d features).
* `energy.*`: the Dream-OOD loss (SPEC §4.4): CE over the ID rows + beta * CE(phi(lse(logits) / T), ID = 1,
  outlier = 0) over all rows, with phi = Linear(1, 2) and with phi = Linear(1, 512) -> ReLU -> Linear(512, 2);
  inputs `energy.logits` [7, 3] (first 4 rows ID), `energy.labels` [4], phi weights `energy.lin.*` and
  `energy.mlp.*`, beta = 2.5, T = 1; outputs `energy.{lin,mlp}.loss`, `.ce`, `.reg` and `.grad_logits`
  (d loss / d logits) and `.grad_phi.*` (d loss / d phi parameters).

Every input is made from closed formulas (sin/cos of the index), so the Rust tests rebuild them or read them.

Run: make fixtures-venv && .deps/venv/bin/python tools/make_training_fixtures.py
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "training"


def formula(shape, phase, scale=1.0):
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + phase) * scale).float().reshape(shape)


def cosine_annealing(step, total_steps, lr_max, lr_min):
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(step / total_steps * math.pi))


def optim_fixture(out):
    a = torch.nn.Parameter(formula([3, 4], 0.1))
    b = torch.nn.Parameter(formula([4], 0.2))
    out["optim.init.a"] = a.detach().clone()
    out["optim.init.b"] = b.detach().clone()
    lr0, steps = 0.1, 7
    opt = torch.optim.SGD([a, b], lr=lr0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda s: cosine_annealing(s, steps, 1, 1e-6 / lr0))
    for s in range(steps):
        opt.zero_grad()
        loss = (torch.sin(a) * (s + 1)).sum() + (b * b * math.cos(s)).sum()
        loss.backward()
        opt.step()
        sched.step()
        out[f"optim.step{s}.a"] = a.detach().clone()
        out[f"optim.step{s}.b"] = b.detach().clone()


def latent_fixture(out):
    f = formula([6, 5], 0.3, 2.0).requires_grad_(True)
    t = formula([4, 5], 1.1, 0.5)
    y = torch.tensor([0, 3, 1, 2, 3, 0])
    # The official code: cos via repeat + F.cosine_similarity (eps 1e-8), / tau, CE.
    b, c = f.shape[0], t.shape[0]
    cos = F.cosine_similarity(f.unsqueeze(1).repeat(1, c, 1), t.unsqueeze(0).repeat(b, 1, 1), dim=2, eps=1e-8)
    loss = F.cross_entropy(cos / 0.1, y)
    loss.backward()
    out["latent.features"] = f.detach().clone()
    out["latent.tokens"] = t
    out["latent.labels"] = y
    out["latent.loss"] = loss.detach().reshape([])
    out["latent.grad"] = f.grad.clone()


def energy_fixture(out):
    beta, temp, n_id = 2.5, 1.0, 4
    logits0 = formula([7, 3], 0.4, 3.0)
    labels = torch.tensor([2, 0, 1, 2])
    out["energy.logits"] = logits0
    out["energy.labels"] = labels
    lin = torch.nn.Linear(1, 2)
    mlp = torch.nn.Sequential(torch.nn.Linear(1, 512), torch.nn.ReLU(), torch.nn.Linear(512, 2))
    with torch.no_grad():
        lin.weight.copy_(formula([2, 1], 0.5, 0.8))
        lin.bias.copy_(formula([2], 0.6, 0.3))
        mlp[0].weight.copy_(formula([512, 1], 0.7, 0.9))
        mlp[0].bias.copy_(formula([512], 0.8, 0.5))
        mlp[2].weight.copy_(formula([2, 512], 0.9, 0.05))
        mlp[2].bias.copy_(formula([2], 1.0, 0.1))
    for name, phi, prefix in [("lin", lin, {"weight": lin.weight, "bias": lin.bias}),
                              ("mlp", mlp, {"0.weight": mlp[0].weight, "0.bias": mlp[0].bias,
                                            "2.weight": mlp[2].weight, "2.bias": mlp[2].bias})]:
        phi.zero_grad()
        logits = logits0.clone().requires_grad_(True)
        ce = F.cross_entropy(logits[:n_id], labels)
        u = torch.logsumexp(logits, dim=1, keepdim=True) / temp
        z = phi(u)
        target = torch.cat([torch.ones(n_id), torch.zeros(logits.shape[0] - n_id)]).long()
        reg = F.cross_entropy(z, target)
        loss = ce + beta * reg
        loss.backward()
        for k, v in prefix.items():
            out[f"energy.{name}.{k}"] = v.detach().clone()
            out[f"energy.{name}.grad_phi.{k}"] = v.grad.clone()
        out[f"energy.{name}.loss"] = loss.detach().reshape([])
        out[f"energy.{name}.ce"] = ce.detach().reshape([])
        out[f"energy.{name}.reg"] = reg.detach().reshape([])
        out[f"energy.{name}.grad_logits"] = logits.grad.clone()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    out = {}
    optim_fixture(out)
    latent_fixture(out)
    energy_fixture(out)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(OUT / "training.safetensors"),
              metadata={"made_by": f"tools/make_training_fixtures.py with torch {torch.__version__}"})
    print(f"wrote {len(out)} tensors to {OUT / 'training.safetensors'}")


if __name__ == "__main__":
    main()
