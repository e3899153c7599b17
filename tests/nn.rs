//! The ResNets of `src/nn/` against PyTorch (`tools/make_resnet_fixtures.py`): the same parameter names and
//! shapes as the PyTorch modules, and the same features and logits for the same weights and input.

use std::collections::HashMap;
use std::path::PathBuf;

use dream_ood::nn::{Depth, ResNetConfig, ResNetWithHead, Stem};
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nn")
        .join(name)
}

use crate::common::resnet_fixture_fill as fill;

fn input() -> Tensor {
    let values: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| (0.01 * i as f64).sin() as f32)
        .collect();
    Tensor::from_slice(&values).view([2, 3, 32, 32])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn build(depth: Depth, stem: Stem) -> (tch::nn::VarStore, ResNetWithHead) {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = ResNetConfig {
        depth,
        stem,
        in_channels: 3,
        width: 64,
    };
    let net = ResNetWithHead::new(&vs.root(), &cfg, "fc", 10);
    (vs, net)
}

#[test]
fn resnets_match_pytorch_names_shapes_and_outputs() {
    let names: HashMap<String, Vec<(String, Vec<i64>)>> =
        serde_json::from_str(&std::fs::read_to_string(fixture("resnet_names.json")).unwrap())
            .unwrap();
    let outputs: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture("resnet_outputs.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    for (depth, arch) in [
        (Depth::Resnet18, "resnet18"),
        (Depth::Resnet34, "resnet34"),
        (Depth::Resnet50, "resnet50"),
    ] {
        for (stem, stem_name) in [(Stem::Cifar, "cifar"), (Stem::Imagenet, "imagenet")] {
            let key = format!("{arch}_{stem_name}");
            let (vs, net) = build(depth, stem);

            // Names and shapes: exactly PyTorch's state_dict (less num_batches_tracked).
            let mut ours: Vec<(String, Vec<i64>)> = vs
                .variables()
                .into_iter()
                .map(|(name, t)| (name, t.size()))
                .collect();
            let mut theirs = names[&key].clone();
            ours.sort();
            theirs.sort();
            assert_eq!(
                ours, theirs,
                "{key}: parameter names or shapes differ from PyTorch"
            );

            // Outputs for the formula-filled weights.
            tch::no_grad(|| {
                for (name, mut var) in vs.variables() {
                    var.copy_(&fill(&name, &var.size()));
                }
            });
            let x = input();
            let (features, logits) = tch::no_grad(|| {
                let f = net.features(&x, false);
                let l = net.head(&f);
                (f, l)
            });
            let want_f = &outputs[&format!("{key}.eval.features")];
            let want_l = &outputs[&format!("{key}.eval.logits")];
            let (df, dl) = (
                max_abs_diff(&features, want_f),
                max_abs_diff(&logits, want_l),
            );
            assert!(
                df <= 1e-4 && dl <= 1e-4,
                "{key} eval: max |diff| features {df:e}, logits {dl:e}"
            );
            // The check has teeth: the logits are not all alike.
            assert!(
                want_l.std(true).double_value(&[]) > 1e-3,
                "{key}: degenerate fixture"
            );

            // Training mode: BatchNorm uses batch statistics (and updates its running stats).
            let train_logits = net.forward_t(&x, true).detach();
            let want = &outputs[&format!("{key}.train.logits")];
            let d = max_abs_diff(&train_logits, want);
            assert!(d <= 1e-4, "{key} train: max |diff| logits {d:e}");
        }
    }
}

#[test]
fn fresh_init_follows_the_official_recipe() {
    let (vs, _net) = build(Depth::Resnet18, Stem::Cifar);
    let vars = vs.variables();
    // BN weight 1, bias 0.
    assert_eq!(vars["encoder.bn1.weight"].min().double_value(&[]), 1.0);
    assert_eq!(vars["encoder.bn1.weight"].max().double_value(&[]), 1.0);
    assert_eq!(
        vars["encoder.layer2.0.shortcut.1.bias"]
            .abs()
            .max()
            .double_value(&[]),
        0.0
    );
    // Conv: kaiming-normal, fan_out = 64·3·3 → std √(2/576) ≈ 0.0589.
    let std = vars["encoder.layer1.0.conv1.weight"]
        .std(true)
        .double_value(&[]);
    assert!(
        (std - (2.0f64 / 576.0).sqrt()).abs() < 0.003,
        "conv std {std}"
    );
    // Linear: PyTorch default, U(±1/√512) for weight and bias (tch's own default would be √(6/512)). The
    // largest of 5120 uniform draws exceeds 0.95·bound with probability 1 − 0.95^5120 ≈ 1; the 10 biases are
    // only checked against the bound.
    let bound = 1.0 / 512f64.sqrt();
    let max = vars["fc.weight"].abs().max().double_value(&[]);
    assert!(
        max <= bound && max > 0.95 * bound,
        "fc.weight: max |w| {max}, bound {bound}"
    );
    let max = vars["fc.bias"].abs().max().double_value(&[]);
    assert!(max <= bound, "fc.bias: max |b| {max}, bound {bound}");
    assert_eq!(vars["fc.weight"].kind(), Kind::Float);
}

/// A dream-ood checkpoint holds exactly the keys, shapes and dtypes of PyTorch's `state_dict` (with
/// `num_batches_tracked`), so `load_state_dict(strict=True)` accepts it; keys from
/// `tools/make_resnet_fixtures.py` (`resnet_state_dict.json`).
#[test]
fn checkpoints_have_the_pytorch_state_dict_keys() {
    use dream_ood::data::Pipeline;
    use dream_ood::nn::checkpoint::{self, CheckpointInfo, NetworkSpec};
    let full: HashMap<String, Vec<(String, Vec<i64>, String)>> =
        serde_json::from_str(&std::fs::read_to_string(fixture("resnet_state_dict.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (depth, arch) in [(Depth::Resnet18, "resnet18"), (Depth::Resnet50, "resnet50")] {
        for (stem, stem_name) in [(Stem::Cifar, "cifar"), (Stem::Imagenet, "imagenet")] {
            let key = format!("{arch}_{stem_name}");
            let (vs, _net) = build(depth, stem);
            let spec = NetworkSpec {
                depth,
                stem,
                in_channels: 3,
                width: 64,
                head: "fc".into(),
                out_dim: 10,
            };
            let path = dir.path().join(format!("{key}.safetensors"));
            let info = CheckpointInfo::new("detector", spec, vec![], Pipeline::cifar_test());
            checkpoint::save(&path, &vs, &info).unwrap();
            let file = checkpoint::read_tensors(&path).unwrap();
            let mut ours: Vec<(String, Vec<i64>, String)> = file
                .tensors
                .iter()
                .map(|(n, t)| {
                    let dtype = match t.kind() {
                        Kind::Float => "torch.float32",
                        Kind::Int64 => "torch.int64",
                        other => panic!("{n}: unexpected {other:?}"),
                    };
                    (n.clone(), t.size(), dtype.to_owned())
                })
                .collect();
            let mut theirs = full[&key].clone();
            ours.sort();
            theirs.sort();
            assert_eq!(ours, theirs, "{key}");
        }
    }
}
