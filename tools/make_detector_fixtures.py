#!/usr/bin/env python3
"""Golden values for VOS in src/detector/ (loss.rs `vos_loss`, `weighted_logsumexp`; vos.rs `FeatureQueue::gaussians`
and the selection rule), computed by PyTorch 2.11 with the code of the official VOS trainer
(deeplearning-wisc/vos@d709a9d classification/CIFAR/train_virtual.py: `log_sum_exp` L161-181, the Gaussian fit
L211-235, the regulariser L236-256, the loss L268-273). The Dream-OOD loss itself is in
tools/make_training_fixtures.py (`energy.*`).

Writes tests/fixtures/detector/vos.safetensors with:

* `loss.*`: ID logits `loss.logits` [5, 3] with labels `loss.labels`, virtual outliers `loss.outliers` [4, 6] scored by
  `net.fc` = Linear(6, 3) (`loss.fc.weight`, `loss.fc.bias`), energy weights `loss.weight_energy` [1, 3] (one of them
  negative, so ReLU matters) and phi = Linear(1, 2) (`loss.phi.weight`, `loss.phi.bias`), loss_weight 0.1. Outputs
  `loss.loss`, `loss.ce`, `loss.reg`, `loss.lse_in` (weighted lse of the ID logits), and the gradients
  `loss.grad.{logits,fc.weight,fc.bias,weight_energy,phi.weight,phi.bias}`.
* `gauss.*`: queues `gauss.queue` [3, 4, 5] -> `gauss.means` [3, 5] and `gauss.cov` [5, 5] as the official loop
  computes them; `gauss.eps` [50, 5] standard-normal draws, the MultivariateNormal(means[1], cov) samples
  `loc + L eps` and `gauss.keep` = topk(-log_prob, 3) indices, which the Rust test checks equal the 3 largest |eps|.

Inputs are closed formulas (sin of the index), except `gauss.eps` (torch.manual_seed(0)).

Run: make fixtures-venv && .deps/venv/bin/python tools/make_detector_fixtures.py
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "detector"


def formula(shape, phase, scale=1.0):
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + phase) * scale).float().reshape(shape)


def loss_fixture(out):
    logits = formula([5, 3], 0.2, 2.5).requires_grad_(True)
    labels = torch.tensor([0, 2, 1, 1, 0])
    outliers = formula([4, 6], 1.3, 1.5)
    fc = torch.nn.Linear(6, 3)
    weight_energy = torch.nn.Linear(3, 1)
    phi = torch.nn.Linear(1, 2)
    with torch.no_grad():
        fc.weight.copy_(formula([3, 6], 0.4, 0.7))
        fc.bias.copy_(formula([3], 0.9, 0.2))
        weight_energy.weight.copy_(torch.tensor([[0.8, -0.3, 0.45]]))
        phi.weight.copy_(formula([2, 1], 0.5, 0.8))
        phi.bias.copy_(formula([2], 0.6, 0.3))

    def log_sum_exp(value, dim):
        # train_virtual.py L161-173, dim given, keepdim False.
        m, _ = torch.max(value, dim=dim, keepdim=True)
        value0 = value - m
        m = m.squeeze(dim)
        return m + torch.log(torch.sum(F.relu(weight_energy.weight) * torch.exp(value0), dim=dim, keepdim=False))

    energy_score_for_fg = log_sum_exp(logits, 1)
    predictions_ood = fc(outliers)
    energy_score_for_bg = log_sum_exp(predictions_ood, 1)
    input_for_lr = torch.cat((energy_score_for_fg, energy_score_for_bg), -1)
    labels_for_lr = torch.cat((torch.ones(len(logits)), torch.zeros(len(outliers))), -1)
    output1 = phi(input_for_lr.view(-1, 1))
    reg = torch.nn.CrossEntropyLoss()(output1, labels_for_lr.long())
    ce = F.cross_entropy(logits, labels)
    loss = ce + 0.1 * reg
    loss.backward()
    out["loss.logits"] = logits.detach().clone()
    out["loss.labels"] = labels
    out["loss.outliers"] = outliers
    out["loss.fc.weight"] = fc.weight.detach().clone()
    out["loss.fc.bias"] = fc.bias.detach().clone()
    out["loss.weight_energy"] = weight_energy.weight.detach().clone()
    out["loss.phi.weight"] = phi.weight.detach().clone()
    out["loss.phi.bias"] = phi.bias.detach().clone()
    out["loss.loss"] = loss.detach().reshape([])
    out["loss.ce"] = ce.detach().reshape([])
    out["loss.reg"] = reg.detach().reshape([])
    out["loss.lse_in"] = energy_score_for_fg.detach().clone()
    out["loss.grad.logits"] = logits.grad.clone()
    out["loss.grad.fc.weight"] = fc.weight.grad.clone()
    out["loss.grad.fc.bias"] = fc.bias.grad.clone()
    out["loss.grad.weight_energy"] = weight_energy.weight.grad.clone()
    out["loss.grad.phi.weight"] = phi.weight.grad.clone()
    out["loss.grad.phi.bias"] = phi.bias.grad.clone()


def gauss_fixture(out):
    num_classes, sample_number, dim = 3, 4, 5
    data_dict = formula([num_classes, sample_number, dim], 0.3, 1.2)
    data_dict[1] += 2.0
    eye_matrix = torch.eye(dim)
    # train_virtual.py L211-225.
    for index in range(num_classes):
        if index == 0:
            X = data_dict[index] - data_dict[index].mean(0)
            mean_embed_id = data_dict[index].mean(0).view(1, -1)
        else:
            X = torch.cat((X, data_dict[index] - data_dict[index].mean(0)), 0)
            mean_embed_id = torch.cat((mean_embed_id, data_dict[index].mean(0).view(1, -1)), 0)
    temp_precision = torch.mm(X.t(), X) / len(X)
    temp_precision += 0.0001 * eye_matrix
    out["gauss.queue"] = data_dict
    out["gauss.means"] = mean_embed_id
    out["gauss.cov"] = temp_precision
    # L228-235 for class 1 with recorded draws: rsample = loc + scale_tril @ eps.
    new_dis = torch.distributions.multivariate_normal.MultivariateNormal(mean_embed_id[1], covariance_matrix=temp_precision)
    torch.manual_seed(0)
    eps = torch.randn(50, dim)
    negative_samples = new_dis.loc + (new_dis.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    prob_density = new_dis.log_prob(negative_samples)
    _, index_prob = torch.topk(-prob_density, 3)
    out["gauss.eps"] = eps
    out["gauss.samples"] = negative_samples
    out["gauss.keep"] = index_prob


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    out = {}
    loss_fixture(out)
    gauss_fixture(out)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(OUT / "vos.safetensors"),
              metadata={"made_by": f"tools/make_detector_fixtures.py with torch {torch.__version__}"})
    print(f"wrote {len(out)} tensors to {OUT / 'vos.safetensors'}")


if __name__ == "__main__":
    main()
