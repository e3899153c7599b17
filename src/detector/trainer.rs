//! The training loop of stage 4: data, model, one step per batch, epoch checkpoints, resume.
//!
//! One step (SPEC §4.3–§4.5):
//!
//! 1. take the next ID batch and, for `dream_ood` / `inlier_aug`, the next generated batch (`concat`:
//!    the epoch ends with the shorter loader; `permute`: the generated loader restarts when it runs out);
//! 2. one forward pass of `[ID; generated]` in train mode (with `permute`, in a seeded random row order,
//!    logits put back in order afterwards);
//! 3. the method's loss ([`super::loss`]); for `vos`, queue the ID features and, once the queues are full
//!    and `epoch ≥ vos.start_epoch`, add the virtual outliers' term;
//! 4. backward, then SGD on the network and on φ / the energy weights with `lr = cosine(step)`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use super::TrainJob;
use super::config::{Batching, Method, PhiInit, TrainConfig};
use super::loss::{self, LossParts, PhiHead};
use super::vos::{self, FeatureQueue};
use crate::data::loader::{Epoch, sample_seed};
use crate::data::source::Format;
use crate::data::{Batch, DataSource, Dataset, Loader, LoaderConfig, Pipeline, check_labels};
use crate::error::{Error, Result};
use crate::nn::ResNetWithHead;
use crate::nn::checkpoint::{self, CheckpointInfo, NetworkSpec};
use crate::nn::optim::{Sgd, SgdConfig, cosine_lr};
use crate::nn::training::{LogRow, Position, TrainFiles, TrainLog, accuracy};
use crate::progress::Progress;

/// Domain tags for the seeds of each random stream, so no two share a generator.
const GENERATED_TAG: u64 = 0x4745_4e5f_494d_4753;
const PERMUTE_TAG: u64 = 0x5045_524d_5554_4521;

/// Batches decoded ahead of the step that needs them.
const PREFETCH: usize = 4;

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub out: std::path::PathBuf,
    /// Finished epochs in the folder now.
    pub epochs_done: u64,
    /// `train.epochs`.
    pub epochs: u64,
    /// The epoch this invocation started from (0 for a fresh run).
    pub resumed_from: u64,
    /// True when the stop flag ended the run before its last epoch.
    pub interrupted: bool,
    /// The last epoch's log row, as (name, value) pairs.
    pub last: Vec<(String, f64)>,
}

/// The trainable pieces: the network, φ, and VOS's class weights of the energy.
pub struct Model {
    pub net: ResNetWithHead,
    pub phi: Option<PhiHead>,
    /// `[1, C]` (VOS's `weight_energy.weight`).
    pub energy_weight: Option<Tensor>,
}

impl Model {
    /// Builds the network under `vs` (`encoder.*`, `fc.*`) and the method's extra parameters under `aux`
    /// (`phi.*`, `weight_energy.weight`), initialised from libtorch's generator (seed it first).
    pub fn new(
        vs: &nn::VarStore,
        aux: &nn::VarStore,
        spec: &NetworkSpec,
        cfg: &TrainConfig,
    ) -> Model {
        let net = spec.build(&vs.root());
        let phi = cfg
            .method
            .uses_phi()
            .then(|| PhiHead::new(&(aux.root() / "phi"), cfg.phi));
        // `torch.nn.init.uniform_(weight_energy.weight)`: U(0, 1).
        let energy_weight = (cfg.method == Method::Vos).then(|| {
            (aux.root() / "weight_energy").var(
                "weight",
                &[1, spec.out_dim],
                nn::Init::Uniform { lo: 0.0, up: 1.0 },
            )
        });
        Model {
            net,
            phi,
            energy_weight,
        }
    }
}

/// One step's inputs, on the training device.
pub struct StepBatch {
    /// `[B_in, C, H, W]`.
    pub images: Tensor,
    /// `[B_in]`.
    pub labels: Tensor,
    /// `[B_gen, C, H, W]` generated images (`dream_ood`, `inlier_aug`).
    pub generated: Option<Tensor>,
    /// `[B_gen]` their classes (`inlier_aug`).
    pub generated_labels: Option<Tensor>,
    /// A row order for the forward pass of `[ID; generated]` (`permute`), `[B_in + B_gen]`.
    pub permutation: Option<Tensor>,
}

/// VOS's per-step context.
pub struct VosStep<'a> {
    pub queue: &'a mut FeatureQueue,
    /// Whether the regulariser is on this step (`epoch ≥ start_epoch`); it also needs full queues.
    pub after_start: bool,
    pub seed: u64,
    pub step: u64,
}

/// A step's loss and the ID logits (for the training accuracy).
pub struct StepOutput {
    pub parts: LossParts,
    pub id_logits: Tensor,
}

/// Forward pass of `x` in train mode, in the row order `perm` when given; logits come back in `x`'s order.
fn forward_rows(net: &ResNetWithHead, x: &Tensor, perm: Option<&Tensor>) -> Tensor {
    match perm {
        None => net.forward_t(x, true),
        Some(p) => {
            let inverse = p.argsort(0, false);
            net.forward_t(&x.index_select(0, p), true)
                .index_select(0, &inverse)
        }
    }
}

fn need<'a>(t: &'a Option<Tensor>, what: &str) -> Result<&'a Tensor> {
    t.as_ref().ok_or_else(|| Error::InvalidValue {
        key: "train.method".into(),
        msg: format!("this method needs {what} in every step"),
    })
}

/// The forward pass and loss of one step (steps 2–3 of the module doc), in the graph, not yet backward.
pub fn step_loss(
    model: &Model,
    cfg: &TrainConfig,
    batch: &StepBatch,
    vos_step: Option<VosStep<'_>>,
) -> Result<StepOutput> {
    let n_in = batch.images.size()[0];
    match cfg.method {
        Method::Baseline => {
            let logits = model.net.forward_t(&batch.images, true);
            Ok(StepOutput {
                parts: loss::ce_loss(&logits, &batch.labels),
                id_logits: logits,
            })
        }
        Method::DreamOod => {
            let gen_images = need(&batch.generated, "generated outliers")?;
            let phi = model.phi.as_ref().expect("invariant: dream_ood builds φ");
            let x = Tensor::cat(&[&batch.images, gen_images], 0);
            let logits = forward_rows(&model.net, &x, batch.permutation.as_ref()); // [B_in + B_gen, C]
            let parts = loss::dream_ood_loss(
                &logits,
                &batch.labels,
                phi,
                cfg.beta,
                cfg.energy_temperature,
            );
            Ok(StepOutput {
                parts,
                id_logits: logits.narrow(0, 0, n_in),
            })
        }
        Method::InlierAug => {
            let gen_images = need(&batch.generated, "generated inliers")?;
            let gen_labels = need(&batch.generated_labels, "labels of the generated inliers")?;
            let x = Tensor::cat(&[&batch.images, gen_images], 0);
            let logits = forward_rows(&model.net, &x, batch.permutation.as_ref());
            let labels = Tensor::cat(&[&batch.labels, gen_labels], 0);
            Ok(StepOutput {
                parts: loss::ce_loss(&logits, &labels),
                id_logits: logits.narrow(0, 0, n_in),
            })
        }
        Method::Vos => {
            let vos_step = vos_step.ok_or_else(|| Error::InvalidValue {
                key: "train.method".into(),
                msg: "vos needs its feature queue in every step".into(),
            })?;
            let features = model.net.features(&batch.images, true); // [B_in, D]
            let logits = model.net.head(&features);
            // The official order: the queues' fullness is read before this step's features go in.
            let active = vos_step.after_start && vos_step.queue.is_full();
            let labels: Vec<i64> = Vec::try_from(&batch.labels)
                .map_err(|e| Error::torch("reading the batch labels", e))?;
            vos_step.queue.push(&features, &labels)?;
            let parts = if active {
                let gaussians = vos_step.queue.gaussians()?;
                let num_classes = model.net.head.ws.size()[0] as usize;
                let dim = features.size()[1] as usize;
                let offsets = vos::draw_offsets(
                    vos_step.seed,
                    vos_step.step,
                    num_classes,
                    dim,
                    cfg.vos.samples,
                    cfg.vos.select,
                );
                let outliers = gaussians.outliers(&offsets, cfg.vos.select); // [C·select, D]
                let virtual_logits = model.net.head(&outliers);
                loss::vos_loss(
                    &logits,
                    &batch.labels,
                    &virtual_logits,
                    model
                        .energy_weight
                        .as_ref()
                        .expect("invariant: vos builds the weights"),
                    model.phi.as_ref().expect("invariant: vos builds φ"),
                    cfg.vos.loss_weight,
                )
            } else {
                loss::ce_loss(&logits, &batch.labels)
            };
            Ok(StepOutput {
                parts,
                id_logits: logits,
            })
        }
    }
}

/// The datasets of a run, opened and checked, as loaders.
struct Data {
    classes: Vec<String>,
    id: Loader,
    generated: Option<Loader>,
    test: Option<Loader>,
}

fn open_data(job: &TrainJob) -> Result<Data> {
    let cfg = &job.train;
    let loader = |ds: Arc<dyn Dataset>,
                  pipeline: Pipeline,
                  batch: usize,
                  shuffle: bool,
                  seed: u64,
                  src: &DataSource| {
        Loader::new(
            ds,
            pipeline,
            LoaderConfig {
                batch_size: batch,
                shuffle,
                seed,
                threads: job.threads,
                prefetch: PREFETCH,
                on_error: src.on_error,
            },
        )
    };
    let train_src = job.data.train.as_ref().ok_or_else(|| Error::InvalidValue {
        key: "data.train".into(),
        msg: "training needs the ID training images: add a [data.train] table".into(),
    })?;
    let train = train_src.open()?;
    let classes = job.data.class_names(train.as_ref(), None)?;
    if classes.len() < 2 {
        return Err(Error::InvalidValue {
            key: "data.train".into(),
            msg: format!(
                "{} holds {} class(es); a classifier needs at least 2",
                train_src.path.display(),
                classes.len()
            ),
        });
    }
    check_labels(train.as_ref(), classes.len(), "data.train", "ID classes")?;
    let id_gray = train.get(0).map(|im| im.channels() == 1).unwrap_or(false);
    let id = loader(
        train,
        job.data.train_pipeline(),
        cfg.batch,
        true,
        job.seed,
        train_src,
    )?;

    let generated = match &job.generated {
        None => None,
        Some(dir) => {
            let manifest = if dir.is_dir() {
                dir.join(crate::data::manifest::MANIFEST)
            } else {
                dir.clone()
            };
            if !manifest.is_file() {
                return Err(Error::InvalidValue {
                    key: "train.outliers".into(),
                    msg: format!(
                        "{} does not exist; {} needs stage 3's output folder (images + {}): run `dream-ood \
                         generate` first or point train.outliers at it",
                        manifest.display(),
                        cfg.method.name(),
                        crate::data::manifest::MANIFEST
                    ),
                });
            }
            let src = DataSource::new(Format::Manifest, dir.clone());
            let ds = src.open()?;
            if cfg.method == Method::InlierAug {
                check_labels(ds.as_ref(), classes.len(), "train.outliers", "ID classes")?;
            }
            tracing::info!(images = ds.len(), folder = %dir.display(), "generated images");
            if id_gray
                && !job.data.outlier_gray
                && ds.get(0).map(|im| im.channels() == 3).unwrap_or(false)
            {
                tracing::warn!(
                    "the ID images are gray and the generated ones colour: the detector can tell them apart \
                     by colour alone; set [data] outlier_gray = true"
                );
            }
            Some(loader(
                ds,
                job.data.outlier_pipeline(),
                cfg.outlier_batch,
                true,
                job.seed ^ GENERATED_TAG,
                &src,
            )?)
        }
    };
    let test = match &job.data.test {
        None => None,
        Some(src) => {
            let ds = src.open()?;
            check_labels(ds.as_ref(), classes.len(), "data.test", "ID classes")?;
            Some(loader(
                ds,
                job.data.eval_pipeline(),
                cfg.batch,
                false,
                job.seed,
                src,
            )?)
        }
    };
    Ok(Data {
        classes,
        id,
        generated,
        test,
    })
}

/// The generated images of one epoch: `concat` ends with its loader; `permute` restarts it (a new seeded
/// pass) whenever it runs out, and every epoch starts a fresh pass, as the official `iter(train_loader_out)`
/// inside `train_permute` does.
struct GeneratedStream<'a> {
    loader: &'a Loader,
    epoch: u64,
    pass: u64,
    restart: bool,
    iter: Option<Epoch>,
    served: usize,
}

impl<'a> GeneratedStream<'a> {
    fn new(loader: &'a Loader, epoch: u64, batching: Batching) -> Self {
        Self {
            loader,
            epoch,
            pass: 0,
            restart: batching == Batching::Permute,
            iter: None,
            served: 0,
        }
    }

    fn next(&mut self) -> Result<Option<Batch>> {
        loop {
            if self.iter.is_none() {
                // Pass p of epoch e has its own shuffle and augmentation draws.
                self.iter = Some(self.loader.epoch((self.epoch << 32) | self.pass)?);
                self.served = 0;
            }
            match self.iter.as_mut().and_then(Iterator::next) {
                Some(batch) => {
                    self.served += 1;
                    return batch.map(Some);
                }
                None => {
                    self.iter = None;
                    if !self.restart {
                        return Ok(None);
                    }
                    if self.served == 0 {
                        return Err(Error::InvalidValue {
                            key: "train.outliers".into(),
                            msg: "no generated image could be loaded in a whole pass (all skipped)"
                                .into(),
                        });
                    }
                    self.pass += 1;
                }
            }
        }
    }
}

/// Steps per epoch: the ID loader's batches, or with `concat` the shorter of the two loaders (SPEC §4.3).
fn steps_per_epoch(data: &Data, cfg: &TrainConfig) -> u64 {
    let n_in = data.id.num_batches() as u64;
    match (&data.generated, cfg.batching) {
        (Some(g), Batching::Concat) => n_in.min(g.num_batches() as u64),
        _ => n_in,
    }
}

/// Moves a step's batches to the device and draws its permutation (`permute`, seeded by the step).
fn step_batch(id: Batch, generated: Option<Batch>, job: &TrainJob, step: u64) -> Result<StepBatch> {
    let device = job.device;
    let to = |t: &Tensor, what: &str| {
        t.f_to_device(device)
            .map_err(|e| Error::torch(format!("moving {what} to {device:?}"), e))
    };
    let images = to(&id.images, "the ID images")?;
    let labels = to(&id.labels, "the ID labels")?;
    let (gen_images, gen_labels) = match &generated {
        Some(g) => (
            Some(to(&g.images, "the generated images")?),
            Some(to(&g.labels, "the generated labels")?),
        ),
        None => (None, None),
    };
    let permutation = match (&generated, job.train.batching) {
        (Some(g), Batching::Permute) => {
            let n = id.indices.len() + g.indices.len();
            let mut order: Vec<i64> = (0..n as i64).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(sample_seed(
                job.seed ^ PERMUTE_TAG,
                step,
                0,
            )));
            Some(to(&Tensor::from_slice(&order), "the permutation")?)
        }
        _ => None,
    };
    Ok(StepBatch {
        images,
        labels,
        generated: gen_images,
        generated_labels: gen_labels,
        permutation,
    })
}

/// Running sums of an epoch, kept on the device so that a step never waits for the GPU.
struct EpochSums {
    loss: Tensor,
    ce: Tensor,
    reg: Tensor,
    correct: Tensor,
    score_in: Tensor,
    score_out: Tensor,
    /// Steps with a regulariser (VOS has none before its start epoch).
    reg_steps: u64,
    steps: u64,
    id_rows: u64,
    images: u64,
}

impl EpochSums {
    fn new(device: Device) -> Self {
        let zero = || Tensor::zeros([], (Kind::Double, device));
        Self {
            loss: zero(),
            ce: zero(),
            reg: zero(),
            correct: zero(),
            score_in: zero(),
            score_out: zero(),
            reg_steps: 0,
            steps: 0,
            id_rows: 0,
            images: 0,
        }
    }

    fn add(&mut self, out: &StepOutput, labels: &Tensor, images: u64) {
        tch::no_grad(|| {
            self.loss += out.parts.loss.detach().to_kind(Kind::Double);
            self.ce += out.parts.ce.detach().to_kind(Kind::Double);
            self.reg += out.parts.reg.detach().to_kind(Kind::Double);
            self.correct += out
                .id_logits
                .argmax(-1, false)
                .eq_tensor(labels)
                .sum(Kind::Double);
            if let Some((s_in, s_out)) = &out.parts.score_means {
                self.score_in += s_in.to_kind(Kind::Double);
                self.score_out += s_out.to_kind(Kind::Double);
                self.reg_steps += 1;
            }
        });
        self.steps += 1;
        self.id_rows += labels.size()[0] as u64;
        self.images += images;
    }

    /// Mean regulariser scores of the ID rows and of the outliers, when the regulariser ran.
    fn score_means(&self) -> Option<(f64, f64)> {
        (self.reg_steps > 0).then(|| {
            let n = self.reg_steps as f64;
            (
                self.score_in.double_value(&[]) / n,
                self.score_out.double_value(&[]) / n,
            )
        })
    }

    /// (loss, ce, reg, train_acc) means.
    fn means(&self) -> (f64, f64, f64, f64) {
        let steps = self.steps.max(1) as f64;
        (
            self.loss.double_value(&[]) / steps,
            self.ce.double_value(&[]) / steps,
            self.reg.double_value(&[]) / steps,
            self.correct.double_value(&[]) / self.id_rows.max(1) as f64,
        )
    }
}

/// Top-1 accuracy of `net` (eval mode) over a loader.
fn test_accuracy(net: &ResNetWithHead, loader: &Loader, device: Device) -> Result<f64> {
    let mut correct = 0.0;
    let mut n = 0usize;
    for batch in loader.epoch(0)? {
        let batch = batch?;
        let rows = batch.indices.len();
        let logits = tch::no_grad(|| net.forward_t(&batch.images.to_device(device), false));
        correct += accuracy(&logits, &batch.labels.to_device(device)) * rows as f64;
        n += rows;
    }
    Ok(if n == 0 { f64::NAN } else { correct / n as f64 })
}

/// The settings that decide a run's trajectory. A folder is resumed only when they are unchanged;
/// paths and thread counts are left out (moving a folder or a dataset does not change the run).
fn settings(job: &TrainJob, num_classes: usize) -> serde_json::Value {
    let cfg = &job.train;
    let mut train = serde_json::to_value(cfg).expect("plain data");
    let map = train
        .as_object_mut()
        .expect("a struct serialises to an object");
    for key in ["outliers", "init", "threads", "out"] {
        map.remove(key);
    }
    let mut drop = |keys: &[&str]| {
        for k in keys {
            map.remove(*k);
        }
    };
    if cfg.method != Method::DreamOod {
        drop(&["beta", "energy_temperature"]);
    }
    if !cfg.method.uses_phi() {
        drop(&["phi", "phi_init"]);
    }
    if !cfg.method.uses_generated() {
        drop(&["outlier_batch", "batching"]);
    }
    if cfg.method != Method::Vos {
        drop(&["vos"]);
    }
    let mut source = job
        .data
        .train
        .as_ref()
        .map(|s| serde_json::to_value(s).expect("plain data"))
        .unwrap_or_default();
    if let Some(m) = source.as_object_mut() {
        m.remove("path");
    }
    serde_json::json!({
        "train": train,
        "seed": job.seed,
        "classes": num_classes,
        "init": cfg.init.is_some(),
        "train_source": source,
        "train_pipeline": job.data.train_pipeline(),
        "generated_pipeline": cfg.method.uses_generated().then(|| job.data.outlier_pipeline()),
    })
}

/// Refuses a folder whose checkpoint was written with other settings, naming the ones that differ.
fn check_same_run(model: &Path, want: &serde_json::Value) -> Result<()> {
    let info = checkpoint::read_info(model)?;
    let Some(have) = info.extra.get("settings") else {
        return Err(Error::Data {
            path: model.to_owned(),
            line: None,
            msg: "is not a dream-ood training checkpoint (no settings recorded); choose another --out".into(),
        });
    };
    if have == want {
        return Ok(());
    }
    let mut differ = Vec::new();
    let (Some(a), Some(b)) = (have.as_object(), want.as_object()) else {
        return Ok(());
    };
    for (k, v) in b {
        match (a.get(k), v) {
            (Some(serde_json::Value::Object(x)), serde_json::Value::Object(y)) => {
                for (kk, vv) in y {
                    if x.get(kk) != Some(vv) {
                        differ.push(format!(
                            "{k}.{kk}: {} → {vv}",
                            x.get(kk).map_or("none".into(), |v| v.to_string())
                        ));
                    }
                }
            }
            (old, new) if old != Some(new) => differ.push(format!(
                "{k}: {} → {new}",
                old.map_or("none".into(), |v| v.to_string())
            )),
            _ => {}
        }
    }
    Err(Error::Data {
        path: model.to_owned(),
        line: None,
        msg: format!(
            "belongs to a run with other settings ({}); rerun with the same settings to resume, or use \
             another train.out / --out",
            differ.join("; ")
        ),
    })
}

/// Copies φ / the energy weights from the state file into `aux`.
fn load_aux(
    aux: &mut nn::VarStore,
    tensors: &BTreeMap<String, Tensor>,
    state: &Path,
) -> Result<()> {
    for (name, mut var) in aux.variables() {
        let t = tensors.get(&name).ok_or_else(|| Error::Data {
            path: state.to_owned(),
            line: None,
            msg: format!("has no `{name}`; the folder was not written by this method"),
        })?;
        if t.size() != var.size() {
            return Err(Error::Shape {
                what: format!("`{name}` in {}", state.display()),
                expected: format!("{:?}", var.size()),
                got: format!("{:?}", t.size()),
            });
        }
        tch::no_grad(|| var.copy_(&t.to_device(var.device())));
    }
    Ok(())
}

/// Runs (or resumes) a training job. The stop flag is read between steps: an interrupted epoch is
/// dropped and the next run redoes it.
pub fn run(job: &TrainJob, progress: &dyn Progress, stop: &AtomicBool) -> Result<TrainReport> {
    let cfg = &job.train;
    let _span = tracing::info_span!("train", method = cfg.method.name()).entered();
    tch::set_num_threads(job.threads as i32);
    if job.device.is_cuda() {
        // The official scripts set cudnn.benchmark = True.
        tch::Cuda::cudnn_set_benchmark(true);
    }

    // 1. Data, then the network and the method's extra parameters.
    let data = open_data(job)?;
    let num_classes = data.classes.len();
    let spec = NetworkSpec {
        depth: cfg.depth,
        stem: cfg.stem,
        in_channels: job.data.channels as i64,
        width: cfg.width,
        head: "fc".into(),
        out_dim: num_classes as i64,
    };
    let files = TrainFiles::new(&job.out);
    let settings = settings(job, num_classes);
    if files.model().exists() {
        check_same_run(&files.model(), &settings)?;
    }
    tch::manual_seed(job.seed as i64);
    let mut vs = nn::VarStore::new(job.device);
    let mut aux = nn::VarStore::new(job.device);
    let model = Model::new(&vs, &aux, &spec, cfg);
    let sgd = SgdConfig {
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        nesterov: true,
    };
    let mut opt = Sgd::new(&vs, sgd);
    let mut aux_opt = Sgd::new(&aux, sgd);
    let mut queue = (cfg.method == Method::Vos).then(|| {
        FeatureQueue::new(
            num_classes,
            cfg.vos.queue,
            model.net.encoder.feature_dim(),
            job.device,
        )
    });

    // 2. Resume, or start from `init` / scratch.
    let pos = match files.resume(&mut vs, &mut opt)? {
        Some((pos, tensors)) => {
            load_aux(&mut aux, &tensors, &files.state())?;
            aux_opt.load_state(&tensors)?;
            if let Some(q) = queue.as_mut() {
                q.load_state(&tensors)?;
            }
            tracing::info!(epoch = pos.epoch, step = pos.step, out = %job.out.display(), "resuming");
            pos
        }
        None => {
            if let (Some(phi), PhiInit::Aligned) = (&model.phi, cfg.phi_init) {
                phi.align();
            }
            if let Some(init) = &cfg.init {
                checkpoint::load_into(init, &mut vs)?;
                tracing::info!(init = %init.display(), "network initialised from a checkpoint");
            }
            Position::default()
        }
    };
    let mut info = CheckpointInfo::new(
        "detector",
        spec.clone(),
        data.classes.clone(),
        job.data.eval_pipeline(),
    );
    info.extra.insert("method".into(), cfg.method.name().into());
    info.extra.insert("settings".into(), settings.clone());
    info.extra.insert("score".into(), "energy".into());
    // The hash `export` records as the training config's: sha256 of the settings JSON (train table, data,
    // seed) this checkpoint was trained with.
    let config_sha256: String = {
        use sha2::Digest;
        sha2::Sha256::digest(settings.to_string().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    info.extra
        .insert("config_sha256".into(), config_sha256.into());
    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    let run_json = serde_json::json!({
        "settings": settings,
        "train_data": job.data.train.as_ref().map(|s| s.path.display().to_string()),
        "generated": job.generated.as_ref().map(|p| p.display().to_string()),
        "init": cfg.init.as_ref().map(|p| p.display().to_string()),
        "device": format!("{:?}", job.device),
        "threads": job.threads,
        "classes": data.classes,
    });
    crate::files::write_atomic(
        &job.out.join("run.json"),
        serde_json::to_string_pretty(&run_json)
            .expect("plain data")
            .as_bytes(),
    )?;

    // 3. Epochs.
    let steps_per_epoch = steps_per_epoch(&data, cfg);
    let total_steps = cfg.epochs * steps_per_epoch;
    let last_epoch = job.until_epoch.unwrap_or(cfg.epochs).min(cfg.epochs);
    let mut log = TrainLog::open(&files, pos.epoch)?;
    let mut report = TrainReport {
        out: job.out.clone(),
        epochs_done: pos.epoch,
        epochs: cfg.epochs,
        resumed_from: pos.epoch,
        interrupted: false,
        last: log.rows().last().map(|r| r.0.clone()).unwrap_or_default(),
    };
    if pos.epoch >= last_epoch {
        tracing::info!(
            epochs = pos.epoch,
            "nothing to do: the run has finished its epochs"
        );
        return Ok(report);
    }
    tracing::info!(
        classes = num_classes,
        steps_per_epoch,
        epochs = cfg.epochs,
        from_epoch = pos.epoch,
        device = ?job.device,
        threads = job.threads,
        "training"
    );
    progress.start(
        "train",
        pos.step + (last_epoch - pos.epoch) * steps_per_epoch,
        pos.step,
    );
    let mut step = pos.step;
    for epoch in pos.epoch..last_epoch {
        let started = Instant::now();
        let mut sums = EpochSums::new(job.device);
        let mut id_batches = data.id.epoch(epoch)?;
        let mut generated = data
            .generated
            .as_ref()
            .map(|l| GeneratedStream::new(l, epoch, cfg.batching));
        let mut lr = cosine_lr(step, total_steps, cfg.lr, cfg.lr_min);
        // Time spent blocked on the loaders: near zero when decoding keeps ahead of training.
        let mut data_wait = 0.0f64;
        for _ in 0..steps_per_epoch {
            if stop.load(Ordering::SeqCst) {
                progress.finish();
                tracing::warn!(
                    epoch = epoch + 1,
                    "interrupted; the unfinished epoch is redone on resume"
                );
                report.interrupted = true;
                return Ok(report);
            }
            let waited = Instant::now();
            let Some(id) = id_batches.next().transpose()? else {
                break;
            };
            let gen_batch = match generated.as_mut() {
                Some(g) => match g.next()? {
                    Some(b) => Some(b),
                    None => break,
                },
                None => None,
            };
            data_wait += waited.elapsed().as_secs_f64();
            let images =
                (id.indices.len() + gen_batch.as_ref().map_or(0, |b| b.indices.len())) as u64;
            let batch = step_batch(id, gen_batch, job, step)?;
            lr = cosine_lr(step, total_steps, cfg.lr, cfg.lr_min);
            let vos_step = queue.as_mut().map(|q| VosStep {
                queue: q,
                after_start: epoch >= cfg.vos.start_epoch,
                seed: job.seed,
                step,
            });
            let out = step_loss(&model, cfg, &batch, vos_step)?;
            opt.zero_grad();
            aux_opt.zero_grad();
            out.parts.loss.backward();
            opt.step(lr);
            aux_opt.step(lr);
            sums.add(&out, &batch.labels, images);
            step += 1;
            progress.advance(1);
        }
        let seconds = started.elapsed().as_secs_f64();
        let (loss, ce, reg, train_acc) = sums.means();
        if !loss.is_finite() {
            progress.finish();
            return Err(Error::Check {
                what: format!("training epoch {}", epoch + 1),
                msg: format!(
                    "the loss is {loss}: the run diverged; lower train.lr (now {})",
                    cfg.lr
                ),
            });
        }
        let test_acc = match &data.test {
            Some(l) => Some(test_accuracy(&model.net, l, job.device)?),
            None => None,
        };
        let mut extra: Vec<(String, Tensor)> = aux.variables().into_iter().collect();
        extra.extend(aux_opt.state());
        if let Some(q) = &queue {
            extra.extend(q.state());
        }
        files.save_epoch(
            &vs,
            &info,
            &opt,
            extra,
            Position {
                epoch: epoch + 1,
                step,
            },
        )?;
        let images_per_s = sums.images as f64 / seconds.max(1e-9);
        let mut row = LogRow::default();
        row.push("epoch", (epoch + 1) as f64)
            .push("step", step as f64)
            .push("lr", lr)
            .push("loss", loss)
            .push("ce", ce)
            .push("reg", reg)
            .push("train_acc", train_acc);
        if let Some(a) = test_acc {
            row.push("test_acc", a);
        }
        if let Some((s_in, s_out)) = sums.score_means() {
            row.push("score_in", s_in).push("score_out", s_out);
            if s_in <= s_out {
                tracing::warn!(
                    epoch = epoch + 1,
                    score_in = format!("{s_in:.3}"),
                    score_out = format!("{s_out:.3}"),
                    "the regulariser separates ID and outliers the other way round (mean ID score below \
                     the outliers'): the energy score would rank outliers as ID"
                );
            }
        }
        row.push("seconds", seconds)
            .push("images_per_s", images_per_s)
            .push("data_wait_s", data_wait);
        log.append(row.clone())?;
        tracing::info!(
            epoch = epoch + 1,
            of = cfg.epochs,
            loss = format!("{loss:.4}"),
            ce = format!("{ce:.4}"),
            reg = format!("{reg:.4}"),
            train_acc = format!("{train_acc:.4}"),
            test_acc = test_acc.map(|a| format!("{a:.4}")),
            images_per_s = format!("{images_per_s:.1}"),
            "epoch done"
        );
        report.epochs_done = epoch + 1;
        report.last = row.0;
    }
    progress.finish();
    Ok(report)
}
