#!/usr/bin/env python3
"""Fixtures for stage 2 (`src/sampling/`, tests in tests/sampling.rs).

Why: the Rust kNN and both sampling modes must agree with independent references.

(a) kNN: k-th nearest-neighbour squared L2 distances (and the k nearest indices) of normalised queries
    against unit base rows, computed with scikit-learn's exact `NearestNeighbors` (brute force, float64).
(b) Sampling: a Python port, written for dream-ood, of the official stage-2 algorithm
    (deeplearning-wisc/dream-ood @ fcb89c664e77796282357a8c052b79b1445d8dec, scripts/KNN.py:L11-87 and
    scripts/get_embed_cifar100.py:L57-78; see SPEC §2), run on a tiny bank. It reproduces the official index
    layout (the `view(length, -1)` scramble of the kNN filter and the single-anchor path when keep = 1) and,
    for comparison, the intended per-boundary-point filter. The random draws (which boundary points each
    call perturbs, and the Gaussian noise) are drawn here and saved, so the Rust test replays exactly these
    draws through its `NoiseSource` hook; numpy's and torch's generators are not reproduced in Rust.

Source: numpy / torch 2.11 / scikit-learn from /work/main/.deps/venv (`make fixtures-venv`), seed 20231.
Command: .deps/venv/bin/python tools/make_sampling_fixtures.py  (writes tests/fixtures/sampling/)
Tolerance used by the tests: kNN distances atol 1e-5; sampled embeddings atol 1e-5 (float32 rounding of
the matrix products may differ; the kept candidates must be the same ones).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sampling"
SEED = 20231


def save(name, array):
    np.save(OUT / name, np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------------------------------
# (a) kNN reference
# ---------------------------------------------------------------------------------------------------------
def knn_fixtures(rng):
    queries = (rng.standard_normal((50, 12)) * rng.uniform(0.5, 3.0, (50, 1))).astype(np.float32)
    base = rng.standard_normal((40, 12)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ks = np.array([1, 7, 40], dtype=np.int64)
    nn = NearestNeighbors(n_neighbors=40, algorithm="brute", metric="euclidean").fit(base.astype(np.float64))
    dist, idx = nn.kneighbors(q)
    save("knn_queries.npy", queries)
    save("knn_base.npy", base)
    save("knn_ks.npy", ks)
    save("knn_kth_sq.npy", (dist[:, ks - 1] ** 2).T.astype(np.float64))  # [len(ks), Q]
    save("knn_idx7.npy", idx[:, :7].astype(np.int64))  # [Q, 7]


# ---------------------------------------------------------------------------------------------------------
# (b) port of the official sampling
# ---------------------------------------------------------------------------------------------------------
def kth_sq_dist(queries, base, k):
    """d_K: normalise the queries, then the k-th smallest squared L2 distance (faiss IndexFlatL2 maths)."""
    q = queries / torch.norm(queries, p=2, dim=1, keepdim=True)
    d = (q * q).sum(1, keepdim=True) + (base * base).sum(1)[None, :] - 2.0 * (q @ base.T)
    d = d.clamp_min(0.0)
    return torch.sort(d, dim=1).values[:, k - 1]


def one_call(unit, s, choice, eps, mode):
    """One call of the official generate_outliers (mode 'official') or its intended reading."""
    K, select, P, m, L = s["k"], s["select"], s["anchors"], s["keep"], s["candidates"]
    inl = s["inliers"]
    base = unit / torch.norm(unit, p=2, dim=1, keepdim=True)
    dk = kth_sq_dist(unit, base, K)
    if mode == "official":
        _, boundary = torch.topk(-dk if inl else dk, select)  # as coded; ties fall as topk drops them
    else:
        # intended: a stable sort, ties to the lower row index (mutual k-th neighbours tie exactly)
        boundary = torch.sort(dk, descending=not inl, stable=True).indices[:select]
    picked = boundary[torch.from_numpy(choice)]
    anchors = torch.cat([unit[i : i + 1].repeat(L, 1) for i in picked])  # [P*L, D], block-major
    noise = eps if eps.shape[0] == P * L else eps.repeat(P, 1)
    cand = F.normalize(s["sigma"] * noise + anchors, p=2, dim=1)
    dkc = kth_sq_dist(cand, base, K)
    if mode == "official":
        table = dkc.view(L, -1)  # the scrambled [L, P] view
        _, rows = torch.topk(-table if inl else table, m, dim=0)  # [m, P]
        rows = rows.squeeze()
        if rows.dim() == 1:
            rows = rows.reshape(-1, 1)  # m = 1: [P, 1], one loop iteration, all from block 0
        flat = torch.cat([i * L + rows[:, i] for i in range(rows.shape[1])])
    else:
        table = dkc.view(P, L)
        cols = torch.sort(table, dim=1, descending=not inl, stable=True).indices[:, :m]  # [P, m]
        flat = (cols + torch.arange(P)[:, None] * L).reshape(-1)
    return cand[flat]


def sample_fixture(name, bank, counts, tokens, s, rng, per_anchor=False):
    C, _, D = bank.shape
    P, L, m = s["anchors"], s["candidates"], s["keep"]
    calls = s["per_class"] // (P * m)
    assert calls * P * m == s["per_class"]
    choices = np.zeros((C, calls, P), dtype=np.int64)
    rows = P * L if per_anchor else L
    noise = np.zeros((C, calls, rows, D), dtype=np.float32)
    for c in range(C):
        for j in range(calls):
            choices[c, j] = rng.choice(s["select"], P, replace=False)
            noise[c, j] = torch.randn(rows, D).numpy()
    expected = {}
    for mode in ["official", "intended"]:
        out = []
        for c in range(C):
            unit = F.normalize(torch.from_numpy(bank[c, : counts[c]]), p=2, dim=1)
            calls_out = [one_call(unit, s, choices[c, j], torch.from_numpy(noise[c, j]), mode) for j in range(calls)]
            out.append(torch.cat(calls_out) * torch.from_numpy(tokens[c]).norm())
        expected[mode] = torch.stack(out).numpy()
        save(f"{name}_expected_{mode}.npy", expected[mode])
    save(f"{name}_choices.npy", choices)
    save(f"{name}_noise.npy", noise)
    return {**s, "noise": "per_anchor" if per_anchor else "shared"}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    knn_fixtures(rng)

    # A bank with a dense core and a sparse rim per class; class 1 has 8 padding rows (zeros).
    C, N, D = 3, 48, 16
    scale = np.linspace(0.3, 2.0, N, dtype=np.float32)[:, None]
    bank = np.zeros((C, N, D), dtype=np.float32)
    for c in range(C):
        centre = np.zeros(D, dtype=np.float32)
        centre[c] = 2.5
        bank[c] = rng.standard_normal((N, D)).astype(np.float32) * scale + centre
    counts = [48, 40, 48]
    bank[1, 40:] = 0.0
    tokens = (rng.standard_normal((C, D)) * 0.1).astype(np.float32)
    save("bank.npy", bank)
    (OUT / "bank.json").write_text(json.dumps({"counts": counts}) + "\n")
    save("tokens.npy", tokens)

    settings = {}
    outl = dict(inliers=False, k=8, select=10, anchors=5, keep=2, sigma=0.3, candidates=30, per_class=30)
    settings["outliers"] = sample_fixture("outliers", bank, counts, tokens, outl, rng)
    inl = dict(inliers=True, k=8, select=20, anchors=6, keep=1, sigma=0.1, candidates=30, per_class=12)
    settings["inliers"] = sample_fixture("inliers", bank, counts, tokens, inl, rng)
    settings["outliers_per_anchor"] = sample_fixture("outliers_per_anchor", bank, counts, tokens, outl, rng, True)
    (OUT / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")


if __name__ == "__main__":
    main()
