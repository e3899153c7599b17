#!/usr/bin/env python3
"""Golden values of every OOD score of `src/eval/scores/`, computed with numpy, scikit-learn and PyTorch.

Why: each Rust score must compute what the reference implementations compute. The formulas below follow
OpenOOD v1.5's postprocessors (`mds`, `knn`, `react`, `vim`, `odin`, `ebo`, `mls`, `msp`), the authors' ViM
`benchmark.py`, knn-ood's `run_cifar.py` and Dream-OOD's `utils/score_calculation.py` (ODIN); they are
re-derived here with numpy / scikit-learn / PyTorch calls, not copied from the Rust code.

Inputs (fixed, numpy default_rng(20261126)): C = 4 classes, D = 12 features; 48 "ID training" feature rows
(labels i % 4, ReLU'd Gaussians around a per-class mean, column 0 dead, i.e. all zero, so the covariance is
singular and the pseudo-inverse path is exercised), 20 "test" feature rows, a head W [4, 12], b [4], and
float32 logits = features @ W.T + b. Every score is computed in float64 from those float32 arrays.

ODIN uses the ResNet-18 (CIFAR stem, 10 classes) of `tools/make_resnet_fixtures.py` with its formula-filled
weights (the head scaled by 1e-4), on its input x[i] = sin(0.01 i), [2, 3, 32, 32], T = 1000, eps = 0.0014 and the CIFAR std.

Writes tests/fixtures/eval/scores.safetensors (inputs float32, results float64).
Run: .deps/venv/bin/python tools/make_score_fixtures.py   (numpy, scikit-learn, torch, safetensors)
Tolerance used by tests/eval.rs: 1e-5 relative (KNN distances are float32 products, as faiss's).
"""

import sys
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_resnet_fixtures import Classifier, fill  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "eval"
C, D, N_TRAIN, N_TEST = 4, 12, 48, 20


def inputs(rng):
    centres = rng.normal(0.6, 0.6, size=(C, D))
    train_labels = np.arange(N_TRAIN) % C
    train = np.maximum(centres[train_labels] + rng.normal(0, 0.8, size=(N_TRAIN, D)), 0)
    train[:, 0] = 0.0  # a dead unit: singular covariance
    test_labels = rng.integers(0, C, size=N_TEST)
    test = np.maximum(centres[test_labels] + rng.normal(0, 1.2, size=(N_TEST, D)), 0)
    test[:5] += rng.uniform(0, 3, size=(5, D))  # a few far-off rows
    w = rng.normal(0, 0.5, size=(C, D))
    b = rng.normal(0, 0.2, size=C)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    train, test, w, b = f32(train), f32(test), f32(w), f32(b)
    logits_train = f32(train @ w.T + b)
    logits_test = f32(test @ w.T + b)
    return train, train_labels, test, w, b, logits_train, logits_test


def mahalanobis(train, labels, test):
    """OpenOOD `mds`: class means, EmpiricalCovariance of the class-centred features, -min squared distance."""
    train, test = train.astype(np.float64), test.astype(np.float64)
    means = np.stack([train[labels == c].mean(0) for c in range(C)])
    centred = train - means[labels]
    precision = EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    d = np.stack([np.einsum("nd,de,ne->n", test - m, precision, test - m) for m in means], 1)
    return -d.min(1)


def knn(train, test, k):
    """knn-ood: normalise by (norm + 1e-10) in float32, k-th smallest squared L2 distance (faiss), negated."""
    norm = lambda x: x / (np.linalg.norm(x, ord=2, axis=-1, keepdims=True) + 1e-10)  # noqa: E731
    bank, q = norm(train).astype(np.float64), norm(test).astype(np.float64)
    d = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    return -np.sort(d, axis=1)[:, k - 1]


def react(train, test, w, b, p):
    threshold = np.percentile(train.astype(np.float64).flatten(), p)
    clipped = np.minimum(test.astype(np.float64), threshold)
    return threshold, logsumexp(clipped @ w.T.astype(np.float64) + b.astype(np.float64), axis=1)


def vim(train, test, w, b, dim):
    """ViM `benchmark.py` / OpenOOD `vim`, with eigh for the symmetric covariance."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    train, test = train.astype(np.float64), test.astype(np.float64)
    u = -np.linalg.pinv(w) @ b
    cov = EmpiricalCovariance(assume_centered=True).fit(train - u).covariance_
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(-vals)[dim:]]
    alpha = (train @ w.T + b).max(-1).mean() / np.linalg.norm((train - u) @ ns, axis=-1).mean()
    return alpha, logsumexp(test @ w.T + b, axis=-1) - alpha * np.linalg.norm((test - u) @ ns, axis=-1)


def odin():
    """Dream-OOD `utils/score_calculation.py` ODIN on the formula-filled ResNet-18."""
    model = Classifier("resnet18", "cifar")
    state = {k: fill(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    # The fill formula gives logits near -5e5; scale the head so that softmax(logits / T) is not saturated
    # and float32 rounding of the logits does not dominate the score (tests/eval.rs scales the same way).
    state["fc.weight"] = state["fc.weight"] * 1e-4
    state["fc.bias"] = state["fc.bias"] * 1e-4
    model.load_state_dict(state, strict=False)
    model.eval()
    x = torch.sin(0.01 * torch.arange(2 * 3 * 32 * 32, dtype=torch.float64)).to(torch.float32).reshape(2, 3, 32, 32)
    x.requires_grad_(True)
    temper, noise = 1000.0, 0.0014
    _, outputs = model(x)
    labels = outputs.detach().argmax(1)
    loss = torch.nn.CrossEntropyLoss()(outputs / temper, labels)
    loss.backward()
    gradient = (torch.ge(x.grad.data, 0).float() - 0.5) * 2
    std = torch.tensor([63.0, 62.1, 66.7]) / 255.0
    gradient = gradient / std.view(1, 3, 1, 1)
    perturbed = torch.add(x.data, gradient, alpha=-noise)
    with torch.no_grad():
        _, logits = model(perturbed)
    scores = softmax(logits.double().numpy() / temper, axis=1).max(1)
    return x.detach().numpy(), logits.numpy(), scores


def main():
    rng = np.random.default_rng(20261126)
    train, labels, test, w, b, logits_train, logits_test = inputs(rng)
    z = logits_test.astype(np.float64)
    out = {
        "train_features": train, "train_labels": labels.astype(np.int64), "test_features": test,
        "head_weight": w, "head_bias": b, "train_logits": logits_train, "test_logits": logits_test,
        "msp": softmax(z, axis=1).max(1),
        "max_logit": z.max(1),
        "energy_t1": logsumexp(z, axis=1),
        "energy_t2.5": 2.5 * logsumexp(z / 2.5, axis=1),
        "mahalanobis": mahalanobis(train, labels, test),
        "knn_k1": knn(train, test, 1), "knn_k3": knn(train, test, 3), "knn_k7": knn(train, test, 7),
    }
    out["react_p90_threshold"], out["react_p90"] = react(train, test, w, b, 90)
    out["react_p90_threshold"] = np.array([out["react_p90_threshold"]])
    alpha, out["vim_dim5"] = vim(train, test, w, b, 5)
    out["vim_dim5_alpha"] = np.array([alpha])
    out["odin_input"], out["odin_perturbed_logits"], out["odin_t1000_eps0.0014"] = odin()
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "scores.safetensors"
    made_by = (f"tools/make_score_fixtures.py with numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
               f"torch {torch.__version__}")
    save_file(out, str(path), metadata={"made_by": made_by})
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
