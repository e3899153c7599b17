//! Both native runtimes in one process, through the library API the stages use.

use std::thread;

use dream_ood::runtime::ort_environment;
use tch::nn::{Module, OptimizerConfig};

/// The doctor's fixture (`tools/make_doctor_fixture.py`) and Python onnxruntime's output for its input.
const MODEL: &[u8] = include_bytes!("fixtures/doctor/tiny_mlp.onnx");
const EXPECTED: &str = include_str!("fixtures/doctor/tiny_mlp_expected.json");

fn ort_infer() -> Vec<f32> {
    let expected: serde_json::Value = serde_json::from_str(EXPECTED).unwrap();
    let input: Vec<f32> = expected["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let env = ort_environment().expect("ONNX Runtime loads");
    let mut session = ort::session::Session::builder(env)
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_memory(MODEL)
        .unwrap();
    let tensor = ort::value::Tensor::from_array((vec![2usize, 4], input)).unwrap();
    let outputs = session.run(ort::inputs!["x" => tensor]).unwrap();
    let (_, probs) = outputs["probs"].try_extract_tensor::<f32>().unwrap();
    probs.to_vec()
}

fn assert_matches_python(got: &[f32]) {
    let expected: serde_json::Value = serde_json::from_str(EXPECTED).unwrap();
    let want: Vec<f64> = expected["expected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (*g as f64 - w).abs() <= 1e-5,
            "got {got:?}, Python onnxruntime gave {want:?}"
        );
    }
}

/// Trains a small regression net; returns (first loss, last loss).
fn torch_train(steps: usize) -> (f64, f64) {
    tch::manual_seed(1);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = tch::nn::seq()
        .add(tch::nn::linear(
            vs.root() / "fc1",
            8,
            32,
            Default::default(),
        ))
        .add_fn(|x| x.relu())
        .add(tch::nn::linear(
            vs.root() / "fc2",
            32,
            1,
            Default::default(),
        ));
    let x = tch::Tensor::randn([128, 8], (tch::Kind::Float, tch::Device::Cpu));
    let y = x.sum_dim_intlist(1, true, tch::Kind::Float).sin();
    let mut opt = tch::nn::Adam::default().build(&vs, 1e-2).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        losses.push(loss.double_value(&[]));
        opt.backward_step(&loss);
    }
    (losses[0], *losses.last().unwrap())
}

#[test]
fn train_then_infer_then_train() {
    let (first, last) = torch_train(100);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_matches_python(&ort_infer());
    let (first, last) = torch_train(100);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn train_and_infer_concurrently() {
    thread::scope(|s| {
        let inference = s.spawn(|| (0..20).map(|_| ort_infer()).collect::<Vec<_>>());
        let (first, last) = torch_train(200);
        assert!(last < 0.5 * first, "loss {first} -> {last}");
        for probs in inference.join().unwrap() {
            assert_matches_python(&probs);
        }
    });
}
