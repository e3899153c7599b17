//! `dream-ood generate`: the batch job that decodes outlier embeddings into an ImageFolder of PNGs.
//!
//! Reads an SD export, the embeddings of stage 2 (`[C, M, D]` float32 `.npy`) and a classes file; writes
//! `OUT/<class_index>/<k:07>.png`, one `manifest.jsonl` line per image, and `run.json` (settings, plan id,
//! model hashes, versions). Everything is checked before any work. Writes are atomic (temp file + rename); a
//! rerun skips the images whose manifest line and file checksum agree, so a killed run resumes and a sharded
//! run can be merged by concatenating manifests. The stop flag (Ctrl-C in the CLI) is checked between batches:
//! the batch in flight is finished and its manifest lines are written.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ndarray::{ArrayD, IxDyn};
use ndarray_npy::ReadNpyExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::classes::Classes;
use super::model_dir::SdModelDir;
use super::pipeline::{Quantize, SamplerSettings, StableDiffusion};
use super::plan::{ImageCount, PlannedImage, Shard, initial_latents, plan};
use super::schedulers::{NoiseSource, SchedulerKind};
use super::session::SessionOptions;
use super::tensorrt::JobShapes;
use super::text_encoder::Injection;
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::progress::Progress;

/// Everything a generation run needs, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateJob {
    pub model: PathBuf,
    pub embeddings: PathBuf,
    pub classes: PathBuf,
    pub out: PathBuf,
    pub count: ImageCount,
    pub num_inference_steps: usize,
    pub guidance_scale: f32,
    #[serde(serialize_with = "serialize_kind")]
    pub scheduler: SchedulerKind,
    pub batch_size: usize,
    pub seed: u64,
    #[serde(skip)]
    pub shard: Option<Shard>,
    /// `[K, 4, h, w]` initial latents; image k takes row `k mod K`.
    pub init_latents: Option<PathBuf>,
    /// Image height and width in pixels (a multiple of the VAE's factor, 8 for SD); ignored with
    /// `init_latents`, whose shape decides.
    pub image_size: usize,
    pub quantize: QuantizeMode,
    /// Resize the decoded images to this size before quantising (the official 512 → 256); `None` keeps them.
    pub resize: Option<usize>,
    /// Parallel workers, each with its own sessions; 0 = auto ([`worker_layout`]).
    pub workers: usize,
    /// GPUs to spread the workers over, one worker each; empty = the provider's device.
    pub devices: Vec<i32>,
    #[serde(skip)]
    pub session: SessionOptions,
}

/// How many workers run, and each one's session options.
#[derive(Debug, Clone)]
pub struct WorkerLayout {
    pub workers: usize,
    /// Session options of worker 0 (all workers on the CPU).
    pub session: SessionOptions,
    /// Worker w's device, when the job is spread over GPUs.
    pub devices: Vec<i32>,
}

impl WorkerLayout {
    /// The session options of worker `w`.
    pub fn session_of(&self, w: usize) -> SessionOptions {
        match self.devices.get(w) {
            Some(&device) => SessionOptions {
                provider: self.session.provider.on_device(device),
                ..self.session.clone()
            },
            None => self.session.clone(),
        }
    }
}

/// Chooses the worker layout. CPU, `workers = 0` (auto): one ONNX Runtime session with n threads runs the
/// UNet's small convolutions at well under n times the speed of one thread (measured: 2 threads give about
/// 1.7× of 1), so independent workers with fewer threads each win on throughput; auto takes as many
/// single-thread workers as there are cores, capped so that their model copies use at most half the available
/// memory. GPU: one worker per device of `devices` (in one process), else one. An explicit count splits the
/// cores evenly unless `threads` is set. The choice is logged.
pub fn worker_layout(job: &GenerateJob, dir: &SdModelDir) -> WorkerLayout {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut session = job.session.clone();
    let workers = match (&session.provider, job.workers) {
        (super::session::Provider::Cpu, 0) => {
            let model_bytes: u64 = [&dir.text_encoder, &dir.unet, &dir.vae_decoder]
                .iter()
                .filter_map(|p| p.parent())
                .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            let by_memory = available_memory_bytes().map_or(cores, |avail| {
                ((avail / 2) / model_bytes.max(1)).max(1) as usize
            });
            cores.min(by_memory).max(1)
        }
        (super::session::Provider::Cpu, n) => n,
        _ if !job.devices.is_empty() => job.devices.len(),
        (_, 0) => 1,
        (_, n) => n,
    };
    if session.intra_threads == 0 && matches!(session.provider, super::session::Provider::Cpu) {
        session.intra_threads = (cores / workers).max(1);
    }
    tracing::info!(
        workers,
        intra_threads = session.intra_threads,
        cores,
        "worker layout"
    );
    WorkerLayout {
        workers,
        session,
        devices: job.devices.clone(),
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (Linux).
fn available_memory_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn serialize_kind<S: serde::Serializer>(
    kind: &SchedulerKind,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(kind.name())
}

/// `round` (diffusers) or `floor` (the official script).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QuantizeMode {
    #[default]
    Round,
    Floor,
}

/// One line of `manifest.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the output folder.
    pub file: String,
    pub index: u64,
    pub class_index: usize,
    pub class_name: String,
    pub embedding_row: usize,
    pub seed: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub latent_index: Option<usize>,
    pub scheduler: String,
    pub steps: usize,
    pub guidance: f32,
    pub sha256: String,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerateReport {
    pub planned: usize,
    pub already_done: usize,
    pub generated: usize,
    /// True when the stop flag ended the run early.
    pub interrupted: bool,
    pub seconds: f64,
    /// Workers that ran.
    pub workers: usize,
    /// Share of the workers' generation time spent outside ONNX Runtime session runs (tokenizing, scheduler
    /// maths, conversions, PNG encoding, writing).
    pub outside_sessions: f64,
}

const MANIFEST: &str = "manifest.jsonl";
const RUN_JSON: &str = "run.json";

/// The embedding file, checked.
struct Embeddings {
    data: Vec<f32>,
    rows: usize,
    dim: usize,
}

impl Embeddings {
    fn load(path: &Path, num_classes: usize, hidden: usize) -> Result<Embeddings> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::Data {
            path: path.to_owned(),
            line: None,
            msg,
        };
        let array = ArrayD::<f32>::read_npy(BufReader::new(file)).map_err(|e| {
            bad(format!(
                "expected a float32 .npy of shape [classes, rows, dim]: {e}"
            ))
        })?;
        let &[c, rows, dim] = array.shape() else {
            return Err(bad(format!(
                "expected shape [classes, rows, dim], got {:?}",
                array.shape()
            )));
        };
        if c != num_classes {
            return Err(bad(format!(
                "has {c} classes, the classes file lists {num_classes}"
            )));
        }
        if dim != hidden {
            return Err(bad(format!(
                "embedding width {dim} is not the text encoder's hidden size {hidden}"
            )));
        }
        if rows == 0 {
            return Err(bad("has no rows".to_owned()));
        }
        let data = array
            .as_standard_layout()
            .into_owned()
            .into_raw_vec_and_offset()
            .0;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            let (class, row) = (i / (rows * dim), (i / dim) % rows);
            return Err(bad(format!(
                "value {} at class {class}, row {row} is not finite",
                data[i]
            )));
        }
        Ok(Embeddings { data, rows, dim })
    }

    fn row(&self, class: usize, row: usize) -> &[f32] {
        let start = (class * self.rows + row) * self.dim;
        &self.data[start..start + self.dim]
    }
}

/// sha256 of a file, hex.
fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The plan id: a hash of everything that decides which images exist and what they contain.
fn plan_id(
    job: &GenerateJob,
    classes: &Classes,
    embeddings_sha: &str,
    model_hashes: &[(String, String)],
) -> String {
    let mut h = Sha256::new();
    let settings = serde_json::json!({
        "count": job.count, "steps": job.num_inference_steps, "guidance": job.guidance_scale,
        "scheduler": job.scheduler.name(), "seed": job.seed, "image_size": job.image_size,
        "quantize": job.quantize, "resize": job.resize, "embeddings": embeddings_sha, "models": model_hashes,
        "init_latents": job.init_latents.as_ref().map(|p| p.display().to_string()),
        "prompts": classes.classes.iter().map(|c| (&c.prompt, &c.embedding_word)).collect::<Vec<_>>(),
    });
    h.update(settings.to_string().as_bytes());
    hex(&h.finalize())[..16].to_owned()
}

/// Reads the manifest and keeps the entries whose file exists with the recorded checksum.
fn completed(out: &Path) -> Result<HashMap<u64, ManifestEntry>> {
    let path = out.join(MANIFEST);
    let mut done = HashMap::new();
    if !path.is_file() {
        return Ok(done);
    }
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(&path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: ManifestEntry = match serde_json::from_str(&line) {
            Ok(e) => e,
            // A line cut by a crash mid-write: the image is redone.
            Err(e) => {
                tracing::warn!(manifest = %path.display(), line = i + 1, "ignoring an unreadable manifest line: {e}");
                continue;
            }
        };
        let file = out.join(&entry.file);
        if file.is_file() && sha256_file(&file)? == entry.sha256 {
            done.insert(entry.index, entry);
        }
    }
    Ok(done)
}

/// Encodes one `[H, W, 3]` image as PNG bytes.
fn png_bytes(height: usize, width: usize, pixels: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut bytes);
    image::ImageEncoder::write_image(
        encoder,
        pixels,
        width as u32,
        height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Check {
        what: what.to_owned(),
        msg: format!("PNG encoding failed: {e}"),
    })?;
    Ok(bytes)
}

/// Runs (or resumes) a generation job.
pub fn run_generate(
    job: &GenerateJob,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<GenerateReport> {
    let start = Instant::now();
    // 1. Check every input before any work.
    let classes = Classes::load(&job.classes)?;
    if job.batch_size == 0 {
        return Err(Error::InvalidValue {
            key: "batch".to_owned(),
            msg: "must be at least 1".to_owned(),
        });
    }
    let dir = SdModelDir::open(&job.model)?;
    let init_latents = match &job.init_latents {
        Some(path) => Some(load_init_latents(path)?),
        None => None,
    };
    let factor = dir.vae_scale_factor;
    if init_latents.is_none() && (job.image_size == 0 || !job.image_size.is_multiple_of(factor)) {
        return Err(Error::InvalidValue {
            key: "image_size".to_owned(),
            msg: format!(
                "{} is not a positive multiple of the VAE's factor {factor}",
                job.image_size
            ),
        });
    }
    let latent_shape: Vec<usize> = match &init_latents {
        Some(l) => l.shape()[1..].to_vec(),
        None => vec![4, job.image_size / factor, job.image_size / factor],
    };
    let mut layout = worker_layout(job, &dir);
    // TensorRT builds each engine once, for exactly the batch and latent size of this job.
    layout.session.provider = layout.session.provider.with_job_shapes(JobShapes {
        batch_size: job.batch_size,
        latent: [latent_shape[0], latent_shape[1], latent_shape[2]],
        sequence_length: super::tokenizer::MAX_LENGTH,
    });
    let sd = StableDiffusion::load(dir, &layout.session_of(0))?;
    let embeddings = Embeddings::load(
        &job.embeddings,
        classes.len(),
        sd.text_encoder.hidden_size(),
    )?;
    let anchors = classes
        .classes
        .iter()
        .map(|c| sd.tokenizer.anchor_token(&c.embedding_word))
        .collect::<Result<Vec<u32>>>()?;
    let prompt_ids = classes
        .classes
        .iter()
        .map(|c| sd.tokenizer.encode(&c.prompt))
        .collect::<Result<Vec<_>>>()?;
    for (i, (ids, anchor)) in prompt_ids.iter().zip(&anchors).enumerate() {
        if !ids.contains(anchor) {
            tracing::warn!(
                class = i,
                name = %classes.classes[i].name,
                "the prompt does not contain the anchor token of {:?}: its images ignore the outlier embedding",
                classes.classes[i].embedding_word
            );
        }
    }
    let images = plan(
        classes.len(),
        embeddings.rows,
        job.count,
        job.seed,
        job.shard,
    )?;

    // 2. The output folder: same plan, or empty.
    let embeddings_sha = sha256_file(&job.embeddings)?;
    let model_hashes = [&sd.dir.text_encoder, &sd.dir.unet, &sd.dir.vae_decoder]
        .iter()
        .map(|p| {
            Ok((
                p.strip_prefix(&sd.dir.root)
                    .unwrap_or(p)
                    .display()
                    .to_string(),
                sha256_file(p)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let id = plan_id(job, &classes, &embeddings_sha, &model_hashes);
    fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    check_run_json(&job.out, &id)?;
    let run_json = serde_json::json!({
        "plan_id": id, "job": job, "shard": job.shard.map(|s| format!("{}/{}", s.index, s.count)),
        "embeddings_sha256": embeddings_sha, "models": model_hashes,
        "dream_ood_version": env!("CARGO_PKG_VERSION"),
    });
    write_atomic(
        &job.out.join(RUN_JSON),
        serde_json::to_string_pretty(&run_json)
            .unwrap_or_default()
            .as_bytes(),
    )?;

    // 3. Resume: skip what is complete and verified.
    let done = completed(&job.out)?;
    let todo: Vec<&PlannedImage> = images
        .iter()
        .filter(|img| !done.contains_key(&img.index))
        .collect();
    let mut report = GenerateReport {
        planned: images.len(),
        already_done: images.len() - todo.len(),
        ..Default::default()
    };
    tracing::info!(planned = report.planned, done = report.already_done, plan = %id, out = %job.out.display(), "generate");
    let manifest_path = job.out.join(MANIFEST);
    let manifest = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&manifest_path)
        .map_err(|e| Error::io(&manifest_path, e))?;
    let settings = SamplerSettings {
        scheduler: job.scheduler,
        num_inference_steps: job.num_inference_steps,
        guidance_scale: job.guidance_scale,
    };
    let quantize = match job.quantize {
        QuantizeMode::Round => Quantize::Round,
        QuantizeMode::Floor => Quantize::Floor,
    };
    progress.start(
        "generate",
        report.planned as u64,
        report.already_done as u64,
    );

    // 4. Batches, on `workers` threads with one set of sessions each.
    let ctx = BatchContext {
        job,
        classes: &classes,
        anchors: &anchors,
        embeddings: &embeddings,
        init_latents: init_latents.as_ref(),
        latent_shape: &latent_shape,
        settings,
        quantize,
    };
    let batches: Vec<&[&PlannedImage]> = todo.chunks(job.batch_size).collect();
    let workers = layout.workers.min(batches.len()).max(1);
    let next = AtomicUsize::new(0);
    let sink = Mutex::new(ManifestSink {
        file: manifest,
        path: manifest_path,
        generated: 0,
    });
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    let busy = Mutex::new((Duration::ZERO, Duration::ZERO)); // (generation wall, session wall), summed over workers
    std::thread::scope(|scope| {
        let mut first = Some(sd);
        for w in 0..workers {
            let (ctx, batches, next, sink, failure, failed, layout, busy) = (
                &ctx, &batches, &next, &sink, &failure, &failed, &layout, &busy,
            );
            let own = first.take();
            scope.spawn(move || {
                let _span = tracing::info_span!("generate", worker = w).entered();
                let fail = |e: Error| {
                    failed.store(true, Ordering::SeqCst);
                    failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                };
                let loaded = match own {
                    Some(sd) => Ok(sd),
                    None => SdModelDir::open(&job.model)
                        .and_then(|dir| StableDiffusion::load(dir, &layout.session_of(w))),
                };
                let mut sd = match loaded {
                    Ok(sd) => sd,
                    Err(e) => return fail(e),
                };
                let (started, session_before) = (Instant::now(), sd.session_time);
                let account = |sd: &StableDiffusion| {
                    let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
                    b.0 += started.elapsed();
                    b.1 += sd.session_time - session_before;
                };
                while !stop.load(Ordering::SeqCst) && !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(batch) = batches.get(i) else {
                        return account(&sd);
                    };
                    let written = run_batch(&mut sd, batch, ctx).and_then(|entries| {
                        sink.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .append(&entries)
                    });
                    match written {
                        Ok(()) => progress.advance(batch.len() as u64),
                        Err(e) => return fail(e),
                    }
                }
                account(&sd);
            });
        }
    });
    let sink = sink.into_inner().unwrap_or_else(|p| p.into_inner());
    sink.file.sync_all().map_err(|e| Error::io(&sink.path, e))?;
    progress.finish();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    report.generated = sink.generated;
    report.workers = workers;
    let (wall, sessions) = busy.into_inner().unwrap_or_else(|p| p.into_inner());
    report.outside_sessions = if wall.is_zero() {
        0.0
    } else {
        1.0 - sessions.as_secs_f64() / wall.as_secs_f64()
    };
    report.interrupted = report.already_done + report.generated < report.planned;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// What every batch needs, shared by the workers.
struct BatchContext<'a> {
    job: &'a GenerateJob,
    classes: &'a Classes,
    anchors: &'a [u32],
    embeddings: &'a Embeddings,
    init_latents: Option<&'a ArrayD<f32>>,
    latent_shape: &'a [usize],
    settings: SamplerSettings,
    quantize: Quantize,
}

/// The manifest, appended by one worker at a time.
struct ManifestSink {
    file: File,
    path: PathBuf,
    generated: usize,
}

impl ManifestSink {
    fn append(&mut self, entries: &[ManifestEntry]) -> Result<()> {
        let mut text = String::new();
        for entry in entries {
            text +=
                &(serde_json::to_string(entry).expect("invariant: the entry serialises") + "\n");
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.generated += entries.len();
        Ok(())
    }
}

/// Generates one batch and writes its PNGs (atomically); returns their manifest entries.
fn run_batch(
    sd: &mut StableDiffusion,
    batch: &[&PlannedImage],
    ctx: &BatchContext<'_>,
) -> Result<Vec<ManifestEntry>> {
    let job = ctx.job;
    let prompts: Vec<String> = batch
        .iter()
        .map(|img| ctx.classes.classes[img.class_index].prompt.clone())
        .collect();
    let injections: Vec<Option<Injection>> = batch
        .iter()
        .map(|img| {
            Some(Injection {
                token: ctx.anchors[img.class_index],
                vector: ctx.embeddings.row(img.class_index, img.embedding_row),
            })
        })
        .collect();
    let cond = sd.encode_prompts(&prompts, &injections)?;
    let per_image: usize = ctx.latent_shape.iter().product();
    let mut latent_data = Vec::with_capacity(batch.len() * per_image);
    let mut latent_rows = Vec::with_capacity(batch.len());
    for img in batch {
        match ctx.init_latents {
            Some(l) => {
                let row = (img.index % l.shape()[0] as u64) as usize;
                latent_data.extend(l.index_axis(ndarray::Axis(0), row).iter().copied());
                latent_rows.push(Some(row));
            }
            None => {
                latent_data.extend(initial_latents(img.seed, per_image));
                latent_rows.push(None);
            }
        }
    }
    let mut shape = vec![batch.len()];
    shape.extend(ctx.latent_shape);
    let latents =
        ArrayD::from_shape_vec(IxDyn(&shape), latent_data).expect("invariant: sizes match"); // [B, 4, h, w]
    let mut noise = ImageNoise::new(batch);
    let final_latents = sd.denoise(&cond, latents, &ctx.settings, &mut noise)?;
    let (img_shape, pixels) = sd.decode(&final_latents, ctx.quantize, job.resize)?; // [B, H, W, 3]
    let (h, w) = (img_shape[1], img_shape[2]);
    let mut entries = Vec::with_capacity(batch.len());
    for (i, img) in batch.iter().enumerate() {
        let rel = format!("{}/{:07}.png", img.class_index, img.index);
        let class_dir = job.out.join(img.class_index.to_string());
        fs::create_dir_all(&class_dir).map_err(|e| Error::io(&class_dir, e))?;
        let bytes = png_bytes(h, w, &pixels[i * h * w * 3..(i + 1) * h * w * 3], &rel)?;
        write_atomic(&job.out.join(&rel), &bytes)?;
        entries.push(ManifestEntry {
            file: rel,
            index: img.index,
            class_index: img.class_index,
            class_name: ctx.classes.classes[img.class_index].name.clone(),
            embedding_row: img.embedding_row,
            seed: img.seed,
            latent_index: latent_rows[i],
            scheduler: job.scheduler.name().to_owned(),
            steps: job.num_inference_steps,
            guidance: job.guidance_scale,
            sha256: hex(&Sha256::digest(&bytes)),
        });
    }
    Ok(entries)
}

/// Noise for the stochastic samplers, drawn per image from its own seed so batching does not matter.
struct ImageNoise {
    rngs: Vec<rand_chacha::ChaCha8Rng>,
}

impl ImageNoise {
    fn new(batch: &[&PlannedImage]) -> Self {
        use rand::SeedableRng;
        // A stream apart from the latents' own.
        let rngs = batch
            .iter()
            .map(|img| rand_chacha::ChaCha8Rng::seed_from_u64(img.seed ^ 0x6e6f_6973_6500_0001))
            .collect();
        ImageNoise { rngs }
    }
}

impl NoiseSource for ImageNoise {
    fn standard_normal(&mut self, shape: &[usize]) -> ArrayD<f32> {
        use rand::RngExt;
        let per_image: usize = shape[1..].iter().product();
        let data: Vec<f32> = self
            .rngs
            .iter_mut()
            .flat_map(|rng| {
                (0..per_image)
                    .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
                    .collect::<Vec<_>>()
            })
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), data)
            .expect("invariant: the scheduler asks for [batch, …]")
    }
}

fn load_init_latents(path: &Path) -> Result<ArrayD<f32>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let array = ArrayD::<f32>::read_npy(BufReader::new(file)).map_err(|e| Error::Data {
        path: path.to_owned(),
        line: None,
        msg: format!("expected a float32 .npy of shape [K, 4, h, w]: {e}"),
    })?;
    if array.ndim() != 4 || array.shape()[0] == 0 {
        return Err(Error::Data {
            path: path.to_owned(),
            line: None,
            msg: format!(
                "expected shape [K, 4, h, w] with K >= 1, got {:?}",
                array.shape()
            ),
        });
    }
    Ok(array)
}

/// Refuses an output folder made by a different plan.
fn check_run_json(out: &Path, id: &str) -> Result<()> {
    let path = out.join(RUN_JSON);
    if !path.is_file() {
        if out.join(MANIFEST).is_file() {
            return Err(Error::Data {
                path: out.join(MANIFEST),
                line: None,
                msg: "a manifest without run.json: this folder was not made by this plan; use another --out".to_owned(),
            });
        }
        return Ok(());
    }
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let previous: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Data {
        path: path.clone(),
        line: None,
        msg: e.to_string(),
    })?;
    match previous["plan_id"].as_str() {
        Some(prev) if prev == id => Ok(()),
        prev => Err(Error::Data {
            path,
            line: None,
            msg: format!(
                "holds a run with plan {} but these settings make plan {id}; resume with the same settings or use another --out",
                prev.unwrap_or("(none)")
            ),
        }),
    }
}

impl GenerateJob {
    /// Resolves a `[generate]` table (paths relative to `base`) into a job; names the key at fault.
    pub fn from_config(cfg: &crate::config::GenerateConfig, base: &Path) -> Result<GenerateJob> {
        let required = |value: &Option<PathBuf>, key: &str| -> Result<PathBuf> {
            let path = value.as_ref().ok_or_else(|| Error::InvalidValue {
                key: format!("generate.{key}"),
                msg: format!(
                    "is required (--{} on the command line)",
                    key.replace('_', "-")
                ),
            })?;
            Ok(if path.is_relative() {
                base.join(path)
            } else {
                path.clone()
            })
        };
        let invalid = |key: &str, msg: String| Error::InvalidValue {
            key: format!("generate.{key}"),
            msg,
        };
        let count = match (cfg.per_class, cfg.total) {
            (Some(n), None) if n > 0 => ImageCount::PerClass(n),
            (None, Some(n)) if n > 0 => ImageCount::Total(n),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "per_class",
                    "give per_class or total, not both".to_owned(),
                ));
            }
            (None, None) => return Err(invalid("per_class", "give per_class or total".to_owned())),
            _ => return Err(invalid("per_class", "must be at least 1".to_owned())),
        };
        let scheduler: SchedulerKind = cfg
            .scheduler
            .parse()
            .map_err(|e: Error| invalid("scheduler", e.to_string()))?;
        let quantize = match cfg.quantize.as_str() {
            "round" => QuantizeMode::Round,
            "floor" => QuantizeMode::Floor,
            other => {
                return Err(invalid(
                    "quantize",
                    format!("unknown \"{other}\"; expected round or floor"),
                ));
            }
        };
        let (kind, device) = match cfg.ep.split_once(':') {
            Some((k, d)) => match d.parse::<i32>() {
                Ok(d) if d >= 0 => (k, d),
                _ => {
                    return Err(invalid(
                        "ep",
                        format!("\"{}\": the device must be a number ≥ 0", cfg.ep),
                    ));
                }
            },
            None => (cfg.ep.as_str(), 0),
        };
        let provider = match kind {
            "cpu" if cfg.ep == "cpu" => super::session::Provider::Cpu,
            "cuda" => super::session::Provider::Cuda { device },
            "tensorrt" => super::session::Provider::TensorRt {
                device,
                fp16: cfg.trt_fp16,
                cache_dir: super::te_cache::default_root().map(|r| r.join("tensorrt")),
                // Set by `run_generate` once the latent shape is known.
                shapes: None,
            },
            _ => {
                return Err(invalid(
                    "ep",
                    format!(
                        "unknown \"{}\"; expected cpu, cuda, cuda:N, tensorrt or tensorrt:N",
                        cfg.ep
                    ),
                ));
            }
        };
        if !cfg.devices.is_empty() {
            if matches!(provider, super::session::Provider::Cpu) {
                return Err(invalid(
                    "devices",
                    "spreads a GPU job over devices; set ep to cuda or tensorrt".to_owned(),
                ));
            }
            if let Some(&bad) = cfg.devices.iter().find(|&&d| d < 0) {
                return Err(invalid("devices", format!("{bad} is not a device number")));
            }
        }
        if !(cfg.guidance.is_finite() && cfg.guidance >= 0.0) {
            return Err(invalid(
                "guidance",
                format!("must be a finite number >= 0, got {}", cfg.guidance),
            ));
        }
        if cfg.steps == 0 || cfg.batch == 0 {
            return Err(invalid(
                if cfg.steps == 0 { "steps" } else { "batch" },
                "must be at least 1".to_owned(),
            ));
        }
        Ok(GenerateJob {
            model: required(&cfg.model, "model")?,
            embeddings: required(&cfg.embeddings, "embeddings")?,
            classes: required(&cfg.classes, "classes")?,
            out: required(&cfg.out, "out")?,
            count,
            num_inference_steps: cfg.steps,
            guidance_scale: cfg.guidance,
            scheduler,
            batch_size: cfg.batch,
            seed: cfg.seed,
            shard: None,
            init_latents: cfg.init_latents.as_ref().map(|p| {
                if p.is_relative() {
                    base.join(p)
                } else {
                    p.clone()
                }
            }),
            image_size: cfg.image_size,
            quantize,
            resize: (cfg.resize > 0).then_some(cfg.resize),
            workers: cfg.workers,
            devices: cfg.devices.clone(),
            session: SessionOptions {
                provider,
                intra_threads: cfg.threads,
                text_encoder_cache: super::te_cache::default_root(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GenerateConfig;
    use crate::diffusion::session::Provider;

    fn config(ep: &str, devices: Vec<i32>) -> GenerateConfig {
        GenerateConfig {
            model: Some("m".into()),
            embeddings: Some("e.npy".into()),
            classes: Some("c.toml".into()),
            out: Some("o".into()),
            per_class: Some(1),
            ep: ep.into(),
            devices,
            ..Default::default()
        }
    }

    #[test]
    fn providers_parse_with_their_devices() {
        let job = |ep: &str| GenerateJob::from_config(&config(ep, vec![]), Path::new("."));
        assert_eq!(job("cpu").unwrap().session.provider, Provider::Cpu);
        assert_eq!(
            job("cuda:2").unwrap().session.provider,
            Provider::Cuda { device: 2 }
        );
        match job("tensorrt:1").unwrap().session.provider {
            Provider::TensorRt { device, fp16, .. } => assert_eq!((device, fp16), (1, true)),
            other => panic!("{other:?}"),
        }
        for bad in ["cuda:x", "cpu:1", "gpu", "tensorrt:-1"] {
            let err = job(bad).unwrap_err().to_string();
            assert!(err.contains("generate.ep"), "{bad}: {err}");
        }
    }

    #[test]
    fn devices_give_one_worker_each_on_its_device() {
        let job = GenerateJob::from_config(&config("cuda", vec![0, 3]), Path::new(".")).unwrap();
        let dir = SdModelDir {
            root: "m".into(),
            text_encoder: "m/text_encoder/model.onnx".into(),
            unet: "m/unet/model.onnx".into(),
            vae_decoder: "m/vae_decoder/model.onnx".into(),
            tokenizer: "m/tokenizer".into(),
            scheduler: Default::default(),
            vae_scaling_factor: 0.18215,
            vae_scale_factor: 8,
        };
        let layout = worker_layout(&job, &dir);
        assert_eq!(layout.workers, 2);
        assert_eq!(layout.session_of(0).provider, Provider::Cuda { device: 0 });
        assert_eq!(layout.session_of(1).provider, Provider::Cuda { device: 3 });
        let err = GenerateJob::from_config(&config("cpu", vec![0]), Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("generate.devices"), "{err}");
    }
}
