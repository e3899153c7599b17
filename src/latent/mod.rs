//! Stage 1: the text-conditioned latent space (SPEC §1).
//!
//! A ResNet encoder with a linear head `trans` (512 → D, D = the SD text encoder's width) is trained so that
//! its output points at the token embedding of the image's class: CE(cos(f, T)/τ) ([`loss`]). After
//! training, the outputs of the training images form the feature bank `[C, N, D]` that stage 2 samples
//! the class boundaries of.
//!
//! Files in the output folder (default `<run.out_dir>/latent`):
//!
//! ```text
//! tokens.npy, tokens.json     T [C, D] float32 and where it came from (anchor ids, class names)
//! model.safetensors           the encoder (PyTorch names: encoder.*, trans.*), after the last epoch
//! state.safetensors, log.*    resume state and the epoch log (nn::training)
//! bank.npy, bank.json         the feature bank [C, N, D] float32 and {"counts": [N_c …], …}
//! summary.json                final loss, nearest-token test accuracy, timings
//! ```
//!
//! Rerunning resumes from the last finished epoch; a finished run only rebuilds what is missing.

pub mod config;
pub mod loss;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, Array3};
use ndarray_npy::WriteNpyExt;
use serde::Serialize;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

pub use config::{BankTransform, LatentConfig};

use crate::config::DataConfig;
use crate::data::{Dataset, Loader, LoaderConfig, check_labels};
use crate::diffusion::classes::Classes;
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::nn::checkpoint::{CheckpointInfo, NetworkSpec};
use crate::nn::optim::{Sgd, SgdConfig, cosine_lr};
use crate::nn::training::{LogRow, Position, TrainFiles, TrainLog};
use crate::progress::Progress;

/// Everything stage 1 needs, resolved.
#[derive(Debug, Clone)]
pub struct LatentJob {
    pub settings: LatentConfig,
    pub data: DataConfig,
    pub seed: u64,
    pub device: Device,
    /// Decoding threads (≥ 1).
    pub threads: usize,
    pub out: PathBuf,
}

/// What a finished stage 1 reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct LatentReport {
    pub dream_ood_version: &'static str,
    pub epochs: u64,
    pub steps: u64,
    /// Mean loss of the last epoch trained in this process (`None` when nothing was left to train).
    pub last_epoch_loss: Option<f64>,
    /// Top-1 accuracy of the nearest class token on `[data.test]`, when given.
    pub test_nearest_token_top1: Option<f64>,
    pub bank: PathBuf,
    pub bank_counts: Vec<usize>,
    pub tokens: PathBuf,
    pub device: String,
    pub seconds: f64,
}

/// Where T came from, written beside it.
#[derive(Debug, Clone, Serialize)]
struct TokensInfo {
    source: String,
    classes: Vec<String>,
    /// Anchor token ids, when read from an SD export.
    anchors: Option<Vec<u32>>,
    norms: Vec<f32>,
}

/// The bank's sidecar; `counts` is what stage 2 reads.
#[derive(Debug, Clone, Serialize)]
struct BankInfo {
    counts: Vec<usize>,
    classes: Vec<String>,
    transform: BankTransform,
    /// The encoder epoch the features come from.
    epoch: u64,
    note: &'static str,
}

fn npy_bytes<T: WriteNpyExt>(a: &T) -> Vec<u8> {
    let mut out = Vec::new();
    a.write_npy(&mut out).expect("writing to memory");
    out
}

/// What the labels index in stage 1 (for label errors).
const TOKEN_ROWS: &str = "class token embeddings";

/// Reads or computes T, and writes `tokens.npy` + `tokens.json` into the output folder.
fn prepare_tokens(job: &LatentJob) -> Result<(Array2<f32>, PathBuf)> {
    let s = &job.settings;
    let (tokens, info) = match (&s.tokens, &s.sd_model) {
        (Some(path), None) => {
            let t = crate::sampling::io::read_tokens(path)?;
            let info = TokensInfo {
                source: path.display().to_string(),
                classes: Vec::new(),
                anchors: None,
                norms: Vec::new(),
            };
            (t, info)
        }
        (None, Some(sd)) => {
            let classes_path =
                job.data.classes.as_ref().ok_or_else(|| {
                    Error::InvalidValue {
                key: "data.classes".into(),
                msg: "latent.sd_model needs a classes file ([data] classes) to know each class's \
                      embedding word"
                    .into(),
            }
                })?;
            let classes = Classes::load(classes_path)?;
            let (t, anchors) = tokens::from_sd_model(sd, &classes)?;
            let info = TokensInfo {
                source: format!("{} (text encoder token table)", sd.display()),
                classes: classes.classes.iter().map(|c| c.name.clone()).collect(),
                anchors: Some(anchors),
                norms: Vec::new(),
            };
            (t, info)
        }
        _ => {
            return Err(Error::InvalidValue {
                key: "latent.tokens".into(),
                msg: "give the class token embeddings: latent.tokens (an .npy [C, D]) or \
                      latent.sd_model (an SD export folder, with [data] classes)"
                    .into(),
            });
        }
    };
    let mut info = info;
    info.norms = tokens
        .rows()
        .into_iter()
        .map(|r| r.dot(&r).sqrt())
        .collect();
    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    let path = job.out.join("tokens.npy");
    write_atomic(&path, &npy_bytes(&tokens))?;
    let json = serde_json::to_vec_pretty(&info).expect("plain data");
    write_atomic(&job.out.join("tokens.json"), &json)?;
    Ok((tokens, path))
}

fn to_tensor(a: &Array2<f32>, device: Device) -> Tensor {
    let (r, c) = a.dim();
    Tensor::from_slice(a.as_slice().expect("standard layout"))
        .view([r as i64, c as i64])
        .to_device(device)
}

/// Runs stage 1 (training with resume, test accuracy, feature bank).
pub fn run(job: &LatentJob, progress: &dyn Progress) -> Result<LatentReport> {
    let started = Instant::now();
    let s = &job.settings;
    let (tokens, tokens_path) = prepare_tokens(job)?;
    let (c, d) = tokens.dim();
    let train_set = job
        .data
        .train
        .as_ref()
        .ok_or_else(|| Error::InvalidValue {
            key: "data.train".into(),
            msg: "stage 1 needs the ID training images: add a [data.train] table".into(),
        })?
        .open()?;
    check_labels(train_set.as_ref(), c, "data.train", TOKEN_ROWS)?;
    let names = job.data.class_names(train_set.as_ref(), Some(c))?;
    if names.len() != c {
        return Err(Error::InvalidValue {
            key: "data.classes".into(),
            msg: format!(
                "lists {} classes but the token embeddings have {c} rows",
                names.len()
            ),
        });
    }
    let tokens_unit = loss::unit_rows(&to_tensor(&tokens, job.device));

    tch::manual_seed(job.seed as i64);
    let mut vs = tch::nn::VarStore::new(job.device);
    let spec = NetworkSpec {
        depth: s.depth,
        stem: s.stem,
        in_channels: job.data.channels as i64,
        width: s.width,
        head: "trans".into(),
        out_dim: d as i64,
    };
    let net = spec.build(&vs.root());
    let mut info = CheckpointInfo::new("latent", spec, names.clone(), job.data.eval_pipeline());
    info.extra.insert("tau".into(), s.tau.into());
    info.extra
        .insert("tokens".into(), tokens_path.display().to_string().into());
    let sgd = SgdConfig {
        momentum: s.momentum,
        weight_decay: s.weight_decay,
        nesterov: true,
    };
    let mut opt = Sgd::new(&vs, sgd);
    let files = TrainFiles::new(&job.out);
    let mut pos = match files.resume(&mut vs, &mut opt)? {
        Some((pos, _)) => {
            tracing::info!(
                "stage 1: resuming after epoch {} (step {})",
                pos.epoch,
                pos.step
            );
            pos
        }
        None => Position::default(),
    };
    let mut log = TrainLog::open(&files, pos.epoch)?;

    let loader = Loader::new(
        Arc::clone(&train_set),
        job.data.train_pipeline(),
        LoaderConfig {
            batch_size: s.batch,
            shuffle: true,
            seed: job.seed,
            threads: job.threads,
            prefetch: 4,
            on_error: Default::default(),
        },
    )?;
    let total_steps = s.epochs * loader.num_batches() as u64;
    let mut last_loss = None;
    if pos.epoch < s.epochs {
        progress.start("latent", total_steps, pos.step);
        let result = (|| -> Result<()> {
            while pos.epoch < s.epochs {
                let t0 = Instant::now();
                let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0usize);
                // Time spent blocked on the loader: near zero when decoding keeps ahead of training.
                let mut data_wait = 0.0f64;
                let mut batches = loader.epoch(pos.epoch)?;
                loop {
                    let waited = Instant::now();
                    let Some(batch) = batches.next() else { break };
                    data_wait += waited.elapsed().as_secs_f64();
                    let batch = batch?;
                    let x = batch.images.to_device(job.device);
                    let y = batch.labels.to_device(job.device);
                    let f = net.forward_t(&x, true);
                    let logits = loss::cosine_logits(&f, &tokens_unit, s.tau);
                    let l = logits.cross_entropy_for_logits(&y);
                    opt.zero_grad();
                    l.backward();
                    opt.step(cosine_lr(pos.step, total_steps, s.lr, s.lr_min));
                    let n = y.size()[0] as usize;
                    loss_sum += l.double_value(&[]) * n as f64;
                    correct += crate::nn::training::accuracy(&logits, &y) * n as f64;
                    seen += n;
                    pos.step += 1;
                    progress.advance(1);
                }
                pos.epoch += 1;
                let secs = t0.elapsed().as_secs_f64();
                let mean = loss_sum / seen.max(1) as f64;
                last_loss = Some(mean);
                let mut row = LogRow::default();
                row.push("epoch", pos.epoch as f64)
                    .push("step", pos.step as f64)
                    .push(
                        "lr",
                        cosine_lr(pos.step.saturating_sub(1), total_steps, s.lr, s.lr_min),
                    )
                    .push("loss", mean)
                    .push("train_acc", correct / seen.max(1) as f64)
                    .push("seconds", secs)
                    .push("images_per_s", seen as f64 / secs.max(1e-9))
                    .push("data_wait_s", data_wait);
                files.save_epoch(&vs, &info, &opt, Vec::new(), pos)?;
                log.append(row)?;
                tracing::info!(
                    "stage 1 epoch {}/{}: loss {mean:.4}, train nearest-token acc {:.3}, {:.0} img/s",
                    pos.epoch,
                    s.epochs,
                    correct / seen.max(1) as f64,
                    seen as f64 / secs.max(1e-9)
                );
            }
            Ok(())
        })();
        progress.finish();
        result?;
    } else {
        tracing::info!("stage 1: all {} epochs already trained", s.epochs);
    }

    let test_top1 = match &job.data.test {
        Some(src) => {
            let test_set = src.open()?;
            check_labels(test_set.as_ref(), c, "data.test", TOKEN_ROWS)?;
            Some(nearest_token_accuracy(job, &net, &tokens_unit, test_set)?)
        }
        None => None,
    };
    if let Some(acc) = test_top1 {
        tracing::info!("stage 1: nearest-token top-1 on the test split {acc:.4}");
    }

    let (bank_path, counts) = build_bank(job, &net, train_set, c, d, &names, pos.epoch)?;
    let report = LatentReport {
        dream_ood_version: env!("CARGO_PKG_VERSION"),
        epochs: pos.epoch,
        steps: pos.step,
        last_epoch_loss: last_loss,
        test_nearest_token_top1: test_top1,
        bank: bank_path,
        bank_counts: counts,
        tokens: tokens_path,
        device: format!("{:?}", job.device),
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&report).expect("plain data");
    write_atomic(&job.out.join("summary.json"), &json)?;
    Ok(report)
}

/// Top-1 accuracy of `argmax_c cos(f(x), T_c)` over a dataset, evaluation transform, eval mode.
fn nearest_token_accuracy(
    job: &LatentJob,
    net: &crate::nn::ResNetWithHead,
    tokens_unit: &Tensor,
    dataset: Arc<dyn Dataset>,
) -> Result<f64> {
    let loader = eval_loader(job, dataset, job.data.eval_pipeline(), false)?;
    let (mut correct, mut seen) = (0.0, 0usize);
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0)? {
            let batch = batch?;
            let f = net.forward_t(&batch.images.to_device(job.device), false);
            let logits = loss::cosine_logits(&f, tokens_unit, 1.0);
            let y = batch.labels.to_device(job.device);
            let n = y.size()[0] as usize;
            correct += crate::nn::training::accuracy(&logits, &y) * n as f64;
            seen += n;
        }
        Ok(())
    })?;
    Ok(correct / seen.max(1) as f64)
}

fn eval_loader(
    job: &LatentJob,
    dataset: Arc<dyn Dataset>,
    pipeline: crate::data::Pipeline,
    shuffle: bool,
) -> Result<Loader> {
    Loader::new(
        dataset,
        pipeline,
        LoaderConfig {
            batch_size: job.settings.batch,
            shuffle,
            seed: job.seed,
            threads: job.threads,
            prefetch: 4,
            on_error: Default::default(),
        },
    )
}

/// The feature bank: the first `bank_per_class` outputs seen per class (SPEC §1.6), network in eval mode.
///
/// `official` order: the training loader (augmented, shuffled; its epoch index is `epochs`, one past the
/// last training epoch, so the draws are fresh but seeded). `test`: the evaluation transform in dataset
/// order. The bank has `N = min(bank_per_class, max_c N_c)` rows per class; a class with fewer images
/// than N gets its count in `bank.json`, and its rows past the count are zero padding that stage 2 never
/// reads (SPEC §7 item 9).
fn build_bank(
    job: &LatentJob,
    net: &crate::nn::ResNetWithHead,
    train_set: Arc<dyn Dataset>,
    c: usize,
    d: usize,
    names: &[String],
    epoch: u64,
) -> Result<(PathBuf, Vec<usize>)> {
    let s = &job.settings;
    let mut per_class = vec![0usize; c];
    for i in 0..train_set.len() {
        per_class[train_set.label(i) as usize] += 1;
    }
    let n = s
        .bank_per_class
        .min(per_class.iter().copied().max().unwrap_or(0));
    let (pipeline, shuffle, epoch_index) = match s.bank_transform {
        BankTransform::Train => (job.data.train_pipeline(), true, s.epochs),
        BankTransform::Test => (job.data.eval_pipeline(), false, 0),
    };
    let loader = eval_loader(job, train_set, pipeline, shuffle)?;
    let mut bank = Array3::<f32>::zeros((c, n, d));
    let mut counts = vec![0usize; c];
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(epoch_index)? {
            let batch = batch?;
            if counts.iter().all(|&k| k >= n) {
                break;
            }
            let f = net
                .forward_t(&batch.images.to_device(job.device), false)
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            let rows = Vec::<f32>::try_from(f.flatten(0, -1))
                .map_err(|e| Error::torch("copying bank features", e))?;
            let labels = Vec::<i64>::try_from(&batch.labels)
                .map_err(|e| Error::torch("copying bank labels", e))?;
            for (b, &y) in labels.iter().enumerate() {
                let y = y as usize;
                if counts[y] < n {
                    bank.slice_mut(ndarray::s![y, counts[y], ..])
                        .assign(&ndarray::ArrayView1::from(&rows[b * d..(b + 1) * d]));
                    counts[y] += 1;
                }
            }
        }
        Ok(())
    })?;
    if let Some(empty) = counts.iter().position(|&k| k == 0) {
        return Err(Error::InvalidValue {
            key: "data.train".into(),
            msg: format!(
                "class {empty} ({}) has no training image, so stage 2 has nothing to sample around",
                names[empty]
            ),
        });
    }
    let path = job.out.join("bank.npy");
    write_atomic(&path, &npy_bytes(&bank))?;
    let info = BankInfo {
        counts: counts.clone(),
        classes: names.to_vec(),
        transform: s.bank_transform,
        epoch,
        note: "rows at or past counts[c] are zero padding, never read by stage 2",
    };
    let json = serde_json::to_vec_pretty(&info).expect("plain data");
    write_atomic(&crate::sampling::io::sidecar_path(&path), &json)?;
    Ok((path, counts))
}

/// The default output folder of stage 1 in a run folder.
pub fn default_out(run_dir: &Path) -> PathBuf {
    run_dir.join("latent")
}
