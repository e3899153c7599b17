//! Training code against PyTorch 2.11 (`tools/make_training_fixtures.py`, fixture
//! `tests/fixtures/training/training.safetensors`): the optimiser's trajectory, and the stage-1 and stage-4
//! losses with their gradients.

use std::collections::HashMap;
use std::path::PathBuf;

use dream_ood::nn::optim::{Sgd, SgdConfig, cosine_lr};
use tch::{Device, Kind, Tensor};

pub fn fixture() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/training/training.safetensors");
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// torch.optim.SGD(nesterov, momentum 0.9, wd 5e-4) + per-step LambdaLR cosine, 7 steps.
#[test]
fn sgd_with_cosine_follows_pytorch_step_by_step() {
    let fx = fixture();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let a = vs.root().var_copy("a", &fx["optim.init.a"]);
    let b = vs.root().var_copy("b", &fx["optim.init.b"]);
    let mut opt = Sgd::new(&vs, SgdConfig::default());
    for s in 0..7u64 {
        opt.zero_grad();
        let loss = (a.sin() * (s as f64 + 1.0)).sum(Kind::Float)
            + (&b * &b * (s as f64).cos()).sum(Kind::Float);
        loss.backward();
        opt.step(cosine_lr(s, 7, 0.1, 1e-6));
        for (name, t) in [("a", &a), ("b", &b)] {
            let want = &fx[&format!("optim.step{s}.{name}")];
            let d = max_abs_diff(t, want);
            assert!(d < 1e-6, "step {s} `{name}`: max |diff| {d}");
        }
    }
}

/// Stage 1: CE(cos(f, T)/τ), τ = 0.1, the official repeat + F.cosine_similarity form in PyTorch.
#[test]
fn stage1_loss_and_gradient_equal_pytorch() {
    use dream_ood::latent::loss::{alignment_loss, unit_rows};
    let fx = fixture();
    let f = fx["latent.features"].copy().set_requires_grad(true);
    let t = unit_rows(&fx["latent.tokens"]);
    let loss = alignment_loss(&f, &t, &fx["latent.labels"], 0.1);
    let d = max_abs_diff(&loss, &fx["latent.loss"]);
    assert!(d < 1e-5, "loss differs by {d}");
    loss.backward();
    let d = max_abs_diff(&f.grad(), &fx["latent.grad"]);
    assert!(d < 1e-6, "gradient differs by {d}");
}
