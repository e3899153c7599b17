//! Benchmark helper for `tools/bench_eval.py`: times the fitted scores (KNN, Mahalanobis, ViM) of
//! `dream_ood::eval::scores` on feature files, and writes the scores so the script can check them against
//! its numpy / PyTorch runs of the reference implementations.
//!
//! Usage: `cargo run --release --example bench_eval_scores -- DIR K VIM_DIM`, where DIR holds
//! `train_features.npy` [N, D] f32, `train_labels.npy` [N] i64, `test_features.npy` [Q, D] f32,
//! `head_weight.npy` [C, D] f32 and `head_bias.npy` [C] f32. Prints one JSON object of seconds; writes
//! `DIR/rust_<score>.npy`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use dream_ood::eval::evaluate::write_scores_npy;
use dream_ood::eval::scores::{Head, knn::Knn, mahalanobis::Mahalanobis, vim::Vim};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::ReadNpyExt;
use tch::Tensor;

fn read<T: ndarray_npy::ReadableElement + tch::kind::Element>(
    dir: &Path,
    name: &str,
) -> anyhow::Result<Tensor> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
    let a = ArrayD::<T>::read_npy(file).with_context(|| path.display().to_string())?;
    let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
    let a = a.as_standard_layout().into_dimensionality::<IxDyn>()?;
    Ok(Tensor::from_slice(a.as_slice().context("contiguous")?).view(shape.as_slice()))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: bench_eval_scores DIR K VIM_DIM");
    let dir = PathBuf::from(&args[1]);
    let (k, dim): (usize, usize) = (args[2].parse()?, args[3].parse()?);
    let train = read::<f32>(&dir, "train_features.npy")?;
    let labels = read::<i64>(&dir, "train_labels.npy")?;
    let test = read::<f32>(&dir, "test_features.npy")?;
    let head = Head::new(
        &read::<f32>(&dir, "head_weight.npy")?,
        &read::<f32>(&dir, "head_bias.npy")?,
    )?;
    let classes = head.weight.size()[0];
    let mut times = Vec::new();

    let t = Instant::now();
    let knn = Knn::fit(&train, k)?;
    let s = knn.score(&test)?;
    times.push(("knn", t.elapsed().as_secs_f64()));
    write_scores_npy(&dir.join("rust_knn.npy"), &s)?;

    let t = Instant::now();
    let m = Mahalanobis::fit(&train, &labels, classes)?;
    let s = m.score(&test)?;
    times.push(("mahalanobis", t.elapsed().as_secs_f64()));
    write_scores_npy(&dir.join("rust_mahalanobis.npy"), &s)?;

    let t = Instant::now();
    let v = Vim::fit(&train, &head, dim)?;
    let s = v.score(&test, &head)?;
    times.push(("vim", t.elapsed().as_secs_f64()));
    write_scores_npy(&dir.join("rust_vim.npy"), &s)?;

    let body: Vec<String> = times
        .iter()
        .map(|(n, s)| format!("\"{n}\": {s:.4}"))
        .collect();
    println!("{{{}}}", body.join(", "));
    Ok(())
}
