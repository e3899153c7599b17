//! Running a classifier over a dataset for evaluation: penultimate features, logits and labels of every
//! image, and, when ODIN is asked for, the logits of the ODIN-perturbed inputs.
//!
//! Images go through the loader in dataset order (no shuffling) with the checkpoint's own evaluation
//! pipeline, in eval mode (BatchNorm running statistics). Everything but ODIN runs under `no_grad`.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::scores::odin;
use crate::data::{Dataset, Loader, LoaderConfig, OnError, Pipeline};
use crate::nn::ResNetWithHead;
use crate::progress::Progress;
use crate::{Error, Result};

/// ODIN's settings for a collect pass.
#[derive(Debug, Clone, PartialEq)]
pub struct OdinPass {
    pub temperature: f64,
    pub epsilon: f64,
    /// Per-channel std of the input normalisation (1 where the pipeline does not normalise).
    pub std: Vec<f64>,
}

/// How to run the pass.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    pub batch_size: usize,
    /// Decoding threads.
    pub threads: usize,
    pub device: Device,
    /// Undecodable images: skipped (logged, counted) or an error.
    pub on_error: OnError,
    /// Also compute ODIN-perturbed logits.
    pub odin: Option<OdinPass>,
}

/// What a pass collected, rows in dataset order (less skipped images).
#[derive(Debug)]
pub struct Collected {
    /// `[N, D]` float32 on the CPU.
    pub features: Tensor,
    /// `[N, C]` float32 on the CPU.
    pub logits: Tensor,
    /// `[N]` int64 class labels (−1 for a label outside a class filter).
    pub labels: Tensor,
    /// `[N, C]` float32 logits of the ODIN-perturbed inputs, when asked for.
    pub odin_logits: Option<Tensor>,
    /// Images that could not be decoded and were skipped.
    pub skipped: usize,
}

impl Collected {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Whether no image was collected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn cat(parts: &[Tensor], what: &str) -> Result<Tensor> {
    Tensor::f_cat(parts, 0).map_err(|e| Error::torch(format!("collect: joining {what}"), e))
}

/// Runs `net` over `dataset` through `pipeline`; `stage` names the job for progress and errors.
pub fn collect(
    net: &ResNetWithHead,
    dataset: Arc<dyn Dataset>,
    pipeline: &Pipeline,
    opts: &CollectOptions,
    progress: &dyn Progress,
    stage: &str,
) -> Result<Collected> {
    let total = dataset.len() as u64;
    let loader = Loader::new(
        dataset,
        pipeline.clone(),
        LoaderConfig {
            batch_size: opts.batch_size,
            shuffle: false,
            seed: 0,
            threads: opts.threads.max(1),
            prefetch: 2,
            on_error: opts.on_error,
        },
    )?;
    let (mut feats, mut logits, mut labels, mut odin_logits) = (vec![], vec![], vec![], vec![]);
    progress.start(stage, total, 0);
    let mut epoch = loader.epoch(0)?;
    let result = (|| -> Result<()> {
        for batch in epoch.by_ref() {
            let batch = batch?;
            let n = batch.indices.len() as u64;
            let x = batch.images.f_to_device(opts.device).map_err(|e| {
                Error::torch(format!("{stage}: moving a batch to {:?}", opts.device), e)
            })?;
            let (f, l) = tch::no_grad(|| {
                let f = net.features(&x, false); // [B, D]
                let l = net.head(&f); // [B, C]
                (f, l)
            });
            feats.push(f.to_device(Device::Cpu));
            logits.push(l.to_device(Device::Cpu));
            labels.push(batch.labels);
            if let Some(o) = &opts.odin {
                let p = odin::perturbed_logits(net, &x, o.temperature, o.epsilon, &o.std)?;
                odin_logits.push(p.to_device(Device::Cpu));
            }
            progress.advance(n);
        }
        Ok(())
    })();
    progress.finish();
    result?;
    let skipped = epoch.summary().skipped.len();
    if feats.is_empty() {
        return Err(Error::Check {
            what: stage.to_owned(),
            msg: format!("no image could be read ({skipped} skipped)"),
        });
    }
    if skipped > 0 {
        tracing::warn!(stage, skipped, "images skipped: they could not be decoded");
    }
    Ok(Collected {
        features: cat(&feats, "features")?,
        logits: cat(&logits, "logits")?,
        labels: cat(&labels, "labels")?.to_kind(Kind::Int64),
        odin_logits: if opts.odin.is_some() {
            Some(cat(&odin_logits, "ODIN logits")?)
        } else {
            None
        },
        skipped,
    })
}
