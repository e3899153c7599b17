//! The ONNX exporter against libtorch: for every ResNet in `src/nn/`, ONNX Runtime's `logits` and `score`
//! on a fixed batch equal libtorch's (eval mode) within 1e-4 per unit of logit scale, with batch norm folded.

use dream_ood::nn::weights::named_weights;
use dream_ood::nn::{Depth, ResNetConfig, ResNetWithHead, Stem};
use dream_ood::onnx::export::{
    ClassifierExport, OPSET, Preprocess, ScoreKind, Threshold, export_classifier,
};
use dream_ood::onnx::model::encode_model;
use dream_ood::runtime::ort_environment;
use ort::value::Tensor as OrtTensor;
use tch::{Device, Kind, Tensor};

/// A network with deterministic weights and non-trivial BatchNorm statistics (so folding is really
/// exercised). No RNG: libtorch's generator is global and tests run in parallel.
fn network(
    depth: Depth,
    stem: Stem,
    width: i64,
    classes: i64,
) -> (tch::nn::VarStore, ResNetWithHead) {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = ResNetConfig {
        depth,
        stem,
        in_channels: 3,
        width,
    };
    let net = ResNetWithHead::new(&vs.root(), &cfg, "fc", classes);
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let size = var.size();
            let n: i64 = size.iter().product();
            let phase = name.len() as f64 * 0.37;
            let wave: Vec<f32> = (0..n)
                .map(|i| (1.3 * i as f64 + phase).sin() as f32)
                .collect();
            let wave = Tensor::from_slice(&wave).view(size.as_slice());
            let value = if name.ends_with("running_var") {
                wave * 0.4 + 1.0
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                wave * 0.1
            } else if size.len() == 1 {
                wave * 0.25 + 1.0 // BN weight
            } else {
                let fan_in: i64 = size[1..].iter().product();
                wave * (3.0 / fan_in as f64).sqrt()
            };
            var.copy_(&value);
        }
    });
    (vs, net)
}

fn image_batch(n: i64) -> Tensor {
    let values: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|i| (0.013 * i as f64).sin() as f32)
        .collect();
    Tensor::from_slice(&values).view([n, 3, 32, 32])
}

fn run_onnx(
    model: &dream_ood::onnx::proto::ModelProto,
    input_name: &str,
    input: ort::session::SessionInputValue,
) -> Vec<Vec<f32>> {
    let mut session = ort::session::Session::builder(ort_environment().unwrap())
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_memory(&encode_model(model))
        .unwrap();
    let outputs = session.run(vec![(input_name.to_owned(), input)]).unwrap();
    ["logits", "score"]
        .iter()
        .map(|k| outputs[*k].try_extract_tensor::<f32>().unwrap().1.to_vec())
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn every_resnet_exports_with_libtorch_parity() {
    let standard = [Depth::Resnet18, Depth::Resnet34, Depth::Resnet50]
        .into_iter()
        .flat_map(|d| [(d, Stem::Cifar, 64), (d, Stem::Imagenet, 64)]);
    // Narrow networks (the demo's width 16) too: the exporter must take every width from the weights.
    let narrow = [
        (Depth::Resnet18, Stem::Cifar, 16),
        (Depth::Resnet50, Stem::Imagenet, 8),
    ];
    for (depth, stem, width) in standard.chain(narrow) {
        {
            let (vs, net) = network(depth, stem, width, 10);
            assert_eq!(net.encoder.feature_dim(), depth.feature_dim(width));
            let x = image_batch(3);
            let logits = tch::no_grad(|| net.head(&net.features(&x, false)));
            let want_energy = logits.logsumexp(1, false);

            let spec = ClassifierExport {
                arch: ResNetConfig {
                    depth,
                    stem,
                    in_channels: 3,
                    width,
                },
                head: "fc".to_owned(),
                score: ScoreKind::Energy { temperature: 1.0 },
                threshold: None,
                preprocess: None,
            };
            let model =
                export_classifier(&spec, &named_weights(&vs).unwrap(), &[("score", "energy")])
                    .unwrap();
            assert_eq!(model.opset_import[0].version(), OPSET);
            // BN is folded away: no BatchNormalization node, one Conv per conv layer.
            let graph = model.graph.as_ref().unwrap();
            assert!(
                graph
                    .node
                    .iter()
                    .all(|n| n.op_type() != "BatchNormalization")
            );

            let input = OrtTensor::from_array((vec![3usize, 3, 32, 32], to_vec(&x))).unwrap();
            let got = run_onnx(&model, "input", input.into());
            let (dl, ds) = (
                max_abs_diff(&got[0], &to_vec(&logits)),
                max_abs_diff(&got[1], &to_vec(&want_energy)),
            );
            // 1e-4 absolute per unit of logit scale: f32 rounding grows with the magnitude (ResNet-34/50 reach
            // |logit| ≈ 13 here, where libtorch's unfused BN and ORT's folded conv differ by ~1e-5 relative).
            let scale = logits.abs().max().double_value(&[]).max(1.0) as f32;
            assert!(
                dl <= 1e-4 * scale && ds <= 1e-4 * scale,
                "{depth:?}/{stem:?}/width {width}: max |diff| logits {dl:e}, energy {ds:e} (max |logit| {scale})"
            );
        }
    }
}

#[test]
fn scores_threshold_and_baked_preprocessing() {
    let (vs, net) = network(Depth::Resnet18, Stem::Cifar, 64, 5);
    let weights = named_weights(&vs).unwrap();
    let pre = Preprocess {
        mean: [0.5071, 0.4865, 0.4409],
        std: [0.2673, 0.2564, 0.2762],
    };
    // A uint8 NHWC batch and its normalised NCHW float version, as training's transform makes it.
    let pixels: Vec<u8> = (0..2 * 32 * 32 * 3)
        .map(|i| ((i * 37 + i / 7) % 256) as u8)
        .collect();
    let nhwc = Tensor::from_slice(&pixels)
        .view([2, 32, 32, 3])
        .to_kind(Kind::Float)
        / 255.0;
    let mean = Tensor::from_slice(&pre.mean).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&pre.std).view([1, 3, 1, 1]);
    let x = (nhwc.permute([0, 3, 1, 2]) - mean) / std;
    let logits = tch::no_grad(|| net.head(&net.features(&x, false)));

    for (kind, want) in [
        (
            ScoreKind::Energy { temperature: 2.0 },
            (&logits / 2.0).logsumexp(1, false) * 2.0,
        ),
        (
            ScoreKind::Msp,
            logits.softmax(1, Kind::Float).amax(1, false),
        ),
        (ScoreKind::MaxLogit, logits.amax(1, false)),
    ] {
        let want = to_vec(&want);
        let threshold = (want[0] + want[1]) / 2.0; // one image on each side
        let spec = ClassifierExport {
            arch: ResNetConfig {
                depth: Depth::Resnet18,
                stem: Stem::Cifar,
                in_channels: 3,
                width: 64,
            },
            head: "fc".to_owned(),
            score: kind,
            threshold: Some(Threshold::Global(threshold)),
            preprocess: Some(pre),
        };
        let model = export_classifier(&spec, &weights, &[]).unwrap();
        let mut session = ort::session::Session::builder(ort_environment().unwrap())
            .unwrap()
            .commit_from_memory(&encode_model(&model))
            .unwrap();
        let image = OrtTensor::from_array((vec![2usize, 32, 32, 3], pixels.clone())).unwrap();
        let out = session.run(ort::inputs!["image" => image]).unwrap();
        let logits_got = out["logits"]
            .try_extract_tensor::<f32>()
            .unwrap()
            .1
            .to_vec();
        let score = out["score"].try_extract_tensor::<f32>().unwrap().1.to_vec();
        let is_ood = out["is_ood"]
            .try_extract_tensor::<bool>()
            .unwrap()
            .1
            .to_vec();
        assert!(
            max_abs_diff(&logits_got, &to_vec(&logits)) <= 1e-4,
            "{kind:?}"
        );
        assert!(
            max_abs_diff(&score, &want) <= 1e-4,
            "{kind:?}: {score:?} vs {want:?}"
        );
        let want_ood: Vec<bool> = want.iter().map(|s| *s < threshold).collect();
        assert_eq!(is_ood, want_ood, "{kind:?}");
        assert_ne!(is_ood[0], is_ood[1]);
    }
}

#[test]
fn missing_or_misshapen_weights_are_named() {
    let (vs, _net) = network(Depth::Resnet18, Stem::Cifar, 64, 4);
    let spec = ClassifierExport {
        arch: ResNetConfig {
            depth: Depth::Resnet18,
            stem: Stem::Cifar,
            in_channels: 3,
            width: 64,
        },
        head: "fc".to_owned(),
        score: ScoreKind::MaxLogit,
        threshold: None,
        preprocess: None,
    };
    let mut weights = named_weights(&vs).unwrap();
    weights
        .get_mut("encoder.layer2.0.bn1.running_var")
        .unwrap()
        .dims = vec![64];
    let err = export_classifier(&spec, &weights, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "export: tensor `encoder.layer2.0.bn1.running_var`: expected shape [128], got [64]"
        ),
        "{err}"
    );
    weights.remove("fc.bias");
    weights.insert(
        "encoder.layer2.0.bn1.running_var".to_owned(),
        named_weights(&vs).unwrap()["encoder.layer2.0.bn1.running_var"].clone(),
    );
    let err = export_classifier(&spec, &weights, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("export: the weights have no tensor `fc.bias`"),
        "{err}"
    );
}
