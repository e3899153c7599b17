//! TensorRT optimisation profiles and engine-cache folders for the SD sessions (`--ep tensorrt`).
//!
//! **Profiles.** TensorRT compiles a network into an engine for one range of input shapes, an optimisation
//! profile: a min, opt and max size for every dynamic axis, with kernels tuned for opt and valid anywhere in
//! [min, max]. SD exports declare their batch, latent height and width and token count dynamic (§2.2 of the
//! SD reference notes). Without explicit profiles ONNX Runtime's TensorRT EP builds an engine at the first run
//! for the shapes it sees, and builds it again whenever a later input falls outside them: the batch-1 encoding
//! of the empty prompt at load, then the full batch, then the smaller last batch each cost a build, minutes for
//! the UNet. [`profile_for`] makes the profile from the job instead, so each engine is built once, when its
//! session is created, covers every shape the job feeds, and is tuned for the full batch.
//!
//! **Cache folders.** ONNX Runtime names a cached engine by a hash of the model's file name (not its path),
//! its input and node output names and the ORT, CUDA and TensorRT versions, plus the GPU's compute capability
//! (`…_sm90.engine`). The weights are not in the name: the UNets of SD 1.4 and 1.5 are both `unet/model.onnx`
//! with the same graph, so in one shared folder one would run on the other's engine, that is, with the other's
//! weights. And with explicit profiles ONNX Runtime rebuilds a cached engine whose stored profile (the
//! `.profile` file beside it) differs from the one asked for, so two jobs with different batch sizes sharing a
//! folder would keep rebuilding each other's engines. So each model gets its own folder `<root>/<key>`, the
//! key hashing the model folder's content (the export hash of the text-encoder cache, [`super::te_cache`]),
//! the fp16 switch and the profile ([`engine_cache_dir`]). The timing cache
//! (`TensorrtExecutionProvider_cache_sm<cc>.timing`, per GPU architecture and useful to every model) stays in
//! `<root>`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::onnx::model::{DeclaredInput, declared_inputs, declared_inputs_of_bytes};
use crate::onnx::text_encoder::{INPUT_IDS, INPUTS_EMBEDS};

/// The shapes a generate job feeds the SD models, from which the profiles are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobShapes {
    /// Images per batch (`--batch`); the last batch of a run may hold fewer.
    pub batch_size: usize,
    /// One image's latent `[C, h, w]`: `[4, image_size / 8, image_size / 8]`, or the initial latents' shape.
    pub latent: [usize; 3],
    /// Token positions per prompt (CLIP's 77, [`super::tokenizer::MAX_LENGTH`]).
    pub sequence_length: usize,
}

/// The TensorRT profile of one model as ONNX Runtime takes it (`trt_profile_min_shapes`,
/// `trt_profile_opt_shapes`, `trt_profile_max_shapes`): `name:d0xd1x…` per dynamic input, comma-separated,
/// e.g. `sample:2x4x64x64,encoder_hidden_states:2x77x768`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    pub min: String,
    pub opt: String,
    pub max: String,
}

impl Profile {
    /// True when the model has no dynamic input, so TensorRT needs no profile.
    pub fn is_empty(&self) -> bool {
        self.min.is_empty()
    }
}

/// One axis's sizes, `min ≤ opt ≤ max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AxisRange {
    min: usize,
    opt: usize,
    max: usize,
}

impl AxisRange {
    fn fixed(n: usize) -> AxisRange {
        AxisRange {
            min: n,
            opt: n,
            max: n,
        }
    }
}

/// What dream-ood feeds an SD input, axis by axis, or `None` for an input it never feeds. An axis of `None`
/// is one only the model knows: the hidden width (768 for SD 1.x, 1024 for 2.x), fixed in every SD export.
fn fed_axes(name: &str, job: &JobShapes) -> Option<Vec<Option<AxisRange>>> {
    let b = job.batch_size;
    let seq = Some(AxisRange::fixed(job.sequence_length));
    // Text encoder: the prompts of a batch (1..=B), and the empty prompt alone once at load.
    let prompts = Some(AxisRange {
        min: 1,
        opt: b,
        max: b,
    });
    // UNet: an [uncond; cond] pair of rows per latent (2..=2B); a vector timestep has one value per row.
    let guided = Some(AxisRange {
        min: 2,
        opt: 2 * b,
        max: 2 * b,
    });
    // VAE decoder: one row per image (1..=B).
    let images = prompts;
    let latent = job.latent.map(|n| Some(AxisRange::fixed(n)));
    Some(match name {
        INPUT_IDS => vec![prompts, seq],
        INPUTS_EMBEDS => vec![prompts, seq, None],
        "sample" => [&[guided][..], &latent].concat(),
        "timestep" => vec![guided],
        "encoder_hidden_states" => vec![guided, seq, None],
        "latent_sample" => [&[images][..], &latent].concat(),
        _ => return None,
    })
}

/// The profile of a model with these declared inputs (`what` names it in errors), for a job of these shapes.
///
/// One entry per input with a dynamic axis, in the model's input order, with dynamic axes sized from the job
/// and fixed ones as declared; inputs without dynamic axes (the scalar timestep of optimum ≥ 1.24 exports) are
/// left out, as TensorRT needs no profile for them. Names and axes come from the model, so fp32 and fp16
/// exports, int32 and int64 token ids, and SD 1.x and 2.x widths all work. An error names the input when a
/// dynamic input is not one dream-ood feeds, when its rank or a fixed size disagrees with what the job feeds
/// (an export traced for another size or batch), or when an axis only the model could size is dynamic.
pub fn profile_for(inputs: &[DeclaredInput], job: &JobShapes, what: &str) -> Result<Profile> {
    let err = |msg: String| Error::Onnx {
        what: what.to_owned(),
        msg,
    };
    let (mut min, mut opt, mut max) = (Vec::new(), Vec::new(), Vec::new());
    for input in inputs {
        let name = &input.name;
        let dims = input.dims.as_ref().ok_or_else(|| {
            err(format!(
                "input `{name}` declares no shape; TensorRT needs the rank of every input"
            ))
        })?;
        if dims.iter().all(Option::is_some) {
            continue;
        }
        let fed = fed_axes(name, job).ok_or_else(|| {
            err(format!(
                "input `{name}` has dynamic axes but is not an input dream-ood feeds (expected SD's \
                 {INPUT_IDS}, {INPUTS_EMBEDS}, sample, timestep, encoder_hidden_states, latent_sample)"
            ))
        })?;
        if fed.len() != dims.len() {
            return Err(err(format!(
                "input `{name}` has rank {}; dream-ood feeds it rank {}",
                dims.len(),
                fed.len()
            )));
        }
        let mut axes = Vec::with_capacity(dims.len());
        for (axis, (declared, fed)) in dims.iter().zip(&fed).enumerate() {
            axes.push(match (*declared, fed) {
                (Some(n), Some(r)) if r.min as i64 == n && r.max as i64 == n => *r,
                (Some(n), Some(r)) => {
                    let feeds = if r.min == r.max {
                        r.min.to_string()
                    } else {
                        format!("{} to {}", r.min, r.max)
                    };
                    return Err(err(format!(
                        "axis {axis} of input `{name}` is fixed at {n} by the model, but this job feeds \
                         {feeds}; use the batch and image size the export was made for, or a dynamic export"
                    )));
                }
                (Some(n), None) => AxisRange::fixed(n as usize),
                (None, Some(r)) => *r,
                (None, None) => {
                    return Err(err(format!(
                        "axis {axis} of input `{name}` (the hidden width) is dynamic; TensorRT profiles \
                         need it fixed, as SD exports declare it"
                    )));
                }
            });
        }
        let shape = |pick: fn(&AxisRange) -> usize| {
            let dims: Vec<String> = axes.iter().map(|r| pick(r).to_string()).collect();
            format!("{name}:{}", dims.join("x"))
        };
        min.push(shape(|r| r.min));
        opt.push(shape(|r| r.opt));
        max.push(shape(|r| r.max));
    }
    Ok(Profile {
        min: min.join(","),
        opt: opt.join(","),
        max: max.join(","),
    })
}

/// The engine folder of one model: `<root>/<key>`, the key being 32 hex digits of sha256 over the model's
/// content key, the fp16 switch and the profile (see the module doc for why each is in it).
pub fn engine_cache_dir(root: &Path, model_key: &str, fp16: bool, profile: &Profile) -> PathBuf {
    let text = format!(
        "dream-ood tensorrt engines v1\nmodel {model_key}\nfp16 {fp16}\nmin {}\nopt {}\nmax {}\n",
        profile.min, profile.opt, profile.max
    );
    let hash = Sha256::digest(text.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    root.join(&hex[..32])
}

/// Where a session's model comes from.
#[derive(Debug, Clone, Copy)]
pub enum ModelSource<'a> {
    /// A model file; external data files and the rest of its folder sit beside it.
    File(&'a Path),
    /// A serialised model in memory (the text encoder edited without a cache).
    Memory(&'a [u8]),
}

/// What the TensorRT EP of one session is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrtSessionSettings {
    /// The explicit profile; `None` without job shapes or when the model has no dynamic input.
    pub profile: Option<Profile>,
    /// The engine folder (`trt_engine_cache_path`), created; `None` without a cache root.
    pub engine_dir: Option<PathBuf>,
    /// The timing-cache folder (`trt_timing_cache_path`): the cache root itself, shared by all models.
    pub timing_dir: Option<PathBuf>,
}

/// The TensorRT settings of one session: its profile, read from the model's declared inputs and sized by
/// `shapes`, and its engine folder under `cache_root`, keyed by the model's content. A file's key is the
/// content hash of its whole folder (so external weights count), computed once per process; bytes in memory
/// are hashed as they are.
pub fn session_settings(
    source: ModelSource<'_>,
    what: &str,
    fp16: bool,
    shapes: Option<&JobShapes>,
    cache_root: Option<&Path>,
) -> Result<TrtSessionSettings> {
    let profile = match shapes {
        Some(job) => {
            let inputs = match source {
                ModelSource::File(path) => declared_inputs(path)?,
                ModelSource::Memory(bytes) => declared_inputs_of_bytes(bytes, what)?,
            };
            Some(profile_for(&inputs, job, what)?).filter(|p| !p.is_empty())
        }
        None => None,
    };
    match (&profile, shapes) {
        (Some(p), _) => {
            tracing::info!(model = what, min = %p.min, opt = %p.opt, max = %p.max, "TensorRT profile")
        }
        (None, Some(_)) => tracing::debug!(model = what, "TensorRT: no dynamic inputs, no profile"),
        (None, None) => tracing::info!(
            model = what,
            "TensorRT without an explicit profile: engines are built for the shapes seen at run time"
        ),
    }
    let Some(root) = cache_root else {
        tracing::warn!(
            model = what,
            "TensorRT engine cache off: the engines are built again at every start"
        );
        return Ok(TrtSessionSettings {
            profile,
            engine_dir: None,
            timing_dir: None,
        });
    };
    let model_key = match source {
        ModelSource::File(path) => {
            super::te_cache::memo_key(path.parent().unwrap_or(Path::new(".")))?
        }
        ModelSource::Memory(bytes) => {
            let hash = Sha256::digest(bytes);
            hash.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let engine_dir = engine_cache_dir(root, &model_key, fp16, &profile.clone().unwrap_or_default());
    std::fs::create_dir_all(&engine_dir).map_err(|e| Error::io(&engine_dir, e))?;
    tracing::info!(model = what, engines = %engine_dir.display(), "TensorRT engine cache");
    Ok(TrtSessionSettings {
        profile,
        engine_dir: Some(engine_dir),
        timing_dir: Some(root.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{Dim, ElemType, GraphBuilder};
    use crate::onnx::model::encode_model;

    const B4_512: JobShapes = JobShapes {
        batch_size: 4,
        latent: [4, 64, 64],
        sequence_length: 77,
    };

    /// The declared inputs of a model with these inputs, through the real ONNX encoding and reader.
    fn declared(inputs: &[(&str, ElemType, Vec<Dim>)]) -> Vec<DeclaredInput> {
        let mut g = GraphBuilder::new("m");
        for (name, elem, dims) in inputs {
            g.input(name, *elem, dims);
        }
        declared_inputs_of_bytes(&encode_model(&g.into_model(17, &[])), "m").unwrap()
    }

    fn n(name: &str) -> Dim {
        Dim::named(name)
    }

    /// optimum's UNet (§2.2): dynamic batch, height, width and sequence; fixed channels and hidden width.
    fn unet(elem: ElemType, timestep: Vec<Dim>, hidden: i64) -> Vec<DeclaredInput> {
        declared(&[
            (
                "sample",
                elem,
                vec![n("batch_size"), Dim::Fixed(4), n("height"), n("width")],
            ),
            ("timestep", elem, timestep),
            (
                "encoder_hidden_states",
                elem,
                vec![n("batch_size"), n("sequence_length"), Dim::Fixed(hidden)],
            ),
        ])
    }

    fn profile(min: &str, opt: &str, max: &str) -> Profile {
        Profile {
            min: min.to_owned(),
            opt: opt.to_owned(),
            max: max.to_owned(),
        }
    }

    #[test]
    fn unet_profile_doubles_the_batch_and_covers_a_partial_last_batch() {
        // optimum < 1.24: int64 timestep `[steps]`, one value per row.
        let inputs = unet(ElemType::Float, vec![n("steps")], 768);
        assert_eq!(
            profile_for(&inputs, &B4_512, "unet").unwrap(),
            profile(
                "sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768",
                "sample:8x4x64x64,timestep:8,encoder_hidden_states:8x77x768",
                "sample:8x4x64x64,timestep:8,encoder_hidden_states:8x77x768",
            )
        );
    }

    #[test]
    fn fp16_exports_and_scalar_timesteps_give_the_same_names() {
        // optimum >= 1.24 with --dtype fp16: fp16 I/O, scalar timestep (no dynamic axis, so no entry).
        let fp16 = unet(ElemType::Float16, vec![], 768);
        let fp32 = unet(ElemType::Float, vec![], 768);
        let want = profile(
            "sample:2x4x64x64,encoder_hidden_states:2x77x768",
            "sample:8x4x64x64,encoder_hidden_states:8x77x768",
            "sample:8x4x64x64,encoder_hidden_states:8x77x768",
        );
        assert_eq!(profile_for(&fp16, &B4_512, "unet").unwrap(), want);
        assert_eq!(profile_for(&fp32, &B4_512, "unet").unwrap(), want);
    }

    #[test]
    fn sd2_hidden_width_comes_from_the_model() {
        let job = JobShapes {
            batch_size: 2,
            latent: [4, 96, 96],
            sequence_length: 77,
        };
        let p = profile_for(&unet(ElemType::Float, vec![], 1024), &job, "unet").unwrap();
        assert_eq!(p.max, "sample:4x4x96x96,encoder_hidden_states:4x77x1024");
        let te = declared(&[(
            INPUTS_EMBEDS,
            ElemType::Float,
            vec![n("batch"), n("sequence"), Dim::Fixed(1024)],
        )]);
        let p = profile_for(&te, &job, "text_encoder").unwrap();
        assert_eq!(p.min, "inputs_embeds:1x77x1024");
        assert_eq!(p.opt, "inputs_embeds:2x77x1024");
    }

    #[test]
    fn text_encoder_with_int32_ids_kept() {
        // The edited encoder (`onnx::text_encoder`) keeps `input_ids` when the graph still reads them (e.g.
        // for the EOS position); the diffusers script and optimum < 1.24 declare them int32.
        let inputs = declared(&[
            (
                INPUT_IDS,
                ElemType::Int32,
                vec![n("batch_size"), n("sequence_length")],
            ),
            (
                INPUTS_EMBEDS,
                ElemType::Float,
                vec![n("batch"), n("sequence"), Dim::Fixed(768)],
            ),
        ]);
        assert_eq!(
            profile_for(&inputs, &B4_512, "text_encoder").unwrap(),
            profile(
                "input_ids:1x77,inputs_embeds:1x77x768",
                "input_ids:4x77,inputs_embeds:4x77x768",
                "input_ids:4x77,inputs_embeds:4x77x768",
            )
        );
    }

    #[test]
    fn vae_profile_and_batch_one() {
        let inputs = declared(&[(
            "latent_sample",
            ElemType::Float,
            vec![
                n("batch_size"),
                Dim::Fixed(4),
                n("latent_height"),
                n("latent_width"),
            ],
        )]);
        assert_eq!(
            profile_for(&inputs, &B4_512, "vae_decoder").unwrap(),
            profile(
                "latent_sample:1x4x64x64",
                "latent_sample:4x4x64x64",
                "latent_sample:4x4x64x64",
            )
        );
        let one = JobShapes {
            batch_size: 1,
            latent: [4, 32, 48],
            sequence_length: 77,
        };
        let p = profile_for(&inputs, &one, "vae_decoder").unwrap();
        assert_eq!(p.min, "latent_sample:1x4x32x48");
        assert_eq!(
            (p.opt.as_str(), p.max.as_str()),
            (p.min.as_str(), p.min.as_str())
        );
    }

    #[test]
    fn static_models_need_no_profile() {
        let inputs = declared(&[(
            "latent_sample",
            ElemType::Float,
            vec![Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(64), Dim::Fixed(64)],
        )]);
        let job = JobShapes {
            batch_size: 1,
            ..B4_512
        };
        assert!(profile_for(&inputs, &job, "vae").unwrap().is_empty());
    }

    #[test]
    fn mismatches_are_errors_naming_the_input() {
        let check = |inputs: Vec<DeclaredInput>, job: &JobShapes, want: &str| {
            let err = profile_for(&inputs, job, "unet/model.onnx")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("unet/model.onnx: "), "{err}");
            assert!(err.contains(want), "{err}\nshould contain: {want}");
        };
        // A UNet traced with a fixed 64x64 latent, asked for 256 px images.
        let fixed_size = declared(&[(
            "sample",
            ElemType::Float,
            vec![n("batch"), Dim::Fixed(4), Dim::Fixed(64), Dim::Fixed(64)],
        )]);
        let small = JobShapes {
            latent: [4, 32, 32],
            ..B4_512
        };
        check(
            fixed_size,
            &small,
            "axis 2 of input `sample` is fixed at 64 by the model, but this job feeds 32",
        );
        // A static batch of 2 (one image with guidance) asked for batches of 4.
        let fixed_batch = declared(&[(
            "sample",
            ElemType::Float,
            vec![Dim::Fixed(2), Dim::Fixed(4), n("h"), n("w")],
        )]);
        check(fixed_batch, &B4_512, "this job feeds 2 to 8");
        let unknown = declared(&[(
            "text_embeds",
            ElemType::Float,
            vec![n("batch"), Dim::Fixed(1280)],
        )]);
        check(
            unknown,
            &B4_512,
            "input `text_embeds` has dynamic axes but is not an input dream-ood feeds",
        );
        let hidden = declared(&[(
            "encoder_hidden_states",
            ElemType::Float,
            vec![n("batch"), n("sequence"), n("hidden")],
        )]);
        check(
            hidden,
            &B4_512,
            "axis 2 of input `encoder_hidden_states` (the hidden width) is dynamic",
        );
        let rank = declared(&[("timestep", ElemType::Float, vec![n("a"), n("b")])]);
        check(
            rank,
            &B4_512,
            "input `timestep` has rank 2; dream-ood feeds it rank 1",
        );
        let no_shape = vec![DeclaredInput {
            name: "sample".to_owned(),
            dims: None,
        }];
        check(no_shape, &B4_512, "input `sample` declares no shape");
    }

    #[test]
    fn engine_folders_differ_by_model_precision_and_profile() {
        let root = Path::new("/cache/tensorrt");
        let p = profile("a:1", "a:4", "a:4");
        let base = engine_cache_dir(root, "k1", true, &p);
        assert_eq!(base, engine_cache_dir(root, "k1", true, &p));
        assert_eq!(base.parent(), Some(root));
        assert_eq!(base.file_name().unwrap().len(), 32);
        let others = [
            engine_cache_dir(root, "k2", true, &p),
            engine_cache_dir(root, "k1", false, &p),
            engine_cache_dir(root, "k1", true, &profile("a:1", "a:8", "a:8")),
            engine_cache_dir(root, "k1", true, &Profile::default()),
        ];
        for other in others {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn session_settings_read_the_model_and_key_by_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let write = |sub: &str, hidden: i64| {
            let folder = dir.path().join(sub);
            std::fs::create_dir_all(&folder).unwrap();
            let mut g = GraphBuilder::new("unet");
            g.input(
                "sample",
                ElemType::Float,
                &[n("b"), Dim::Fixed(4), n("h"), n("w")],
            );
            g.input(
                "encoder_hidden_states",
                ElemType::Float,
                &[n("b"), n("s"), Dim::Fixed(hidden)],
            );
            let path = folder.join("model.onnx");
            std::fs::write(&path, encode_model(&g.into_model(17, &[]))).unwrap();
            path
        };
        let (a, b) = (write("a/unet", 768), write("b/unet", 1024));
        let root = dir.path().join("tensorrt");
        let settings = |path: &Path| {
            session_settings(
                ModelSource::File(path),
                "unet",
                true,
                Some(&B4_512),
                Some(&root),
            )
            .unwrap()
        };
        let sa = settings(&a);
        assert_eq!(
            sa.profile.as_ref().unwrap().opt,
            "sample:8x4x64x64,encoder_hidden_states:8x77x768"
        );
        assert!(sa.engine_dir.as_ref().unwrap().is_dir());
        assert_eq!(sa.timing_dir.as_deref(), Some(root.as_path()));
        // Same file name and input names, other content: another folder.
        assert_ne!(settings(&b).engine_dir, sa.engine_dir);
        // No shapes: no profile; no root: no folders.
        let plain = session_settings(ModelSource::File(&a), "unet", true, None, None).unwrap();
        assert_eq!(
            plain,
            TrtSessionSettings {
                profile: None,
                engine_dir: None,
                timing_dir: None
            }
        );
        let bytes = std::fs::read(&a).unwrap();
        let mem = session_settings(
            ModelSource::Memory(&bytes),
            "te",
            true,
            Some(&B4_512),
            Some(&root),
        )
        .unwrap();
        assert_eq!(mem.profile, sa.profile);
    }
}
