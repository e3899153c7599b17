//! Checkpoints: safetensors files with PyTorch parameter names, plus what is needed to rebuild and use
//! the network (architecture, class names, evaluation transform) as JSON in the safetensors metadata.
//!
//! Why safetensors and PyTorch names: weights move between dream-ood and PyTorch both ways. A file written
//! here loads with `model.load_state_dict(safetensors.torch.load_file(path))` into the official
//! `ResNet_Model` (strict: BatchNorm's `num_batches_tracked` is written too), and a `state_dict` saved
//! with `safetensors.torch.save_file` loads here with [`load_into`] (the architecture then comes from the
//! command line, since PyTorch writes no [`CheckpointInfo`]).
//!
//! Layout of the metadata: one key, `dream_ood`, holding [`CheckpointInfo`] as JSON. Tensors are float32
//! (int64 for `num_batches_tracked`); reading also accepts float16, bfloat16 and float64 and converts.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use super::arch::{Depth, ResNetConfig, Stem};
use super::resnet::ResNetWithHead;
use crate::data::Pipeline;
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::onnx::export::{NamedTensor, Weights};

/// The metadata key that holds [`CheckpointInfo`].
pub const METADATA_KEY: &str = "dream_ood";

/// Version of the [`CheckpointInfo`] layout; bumped when a field changes meaning.
pub const FORMAT_VERSION: u32 = 1;

/// Which network a checkpoint holds: a ResNet backbone under `encoder.*` and one linear head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub depth: Depth,
    pub stem: Stem,
    /// Input channels of `encoder.conv1`.
    pub in_channels: i64,
    /// Output channels of `encoder.conv1` ([`ResNetConfig::width`]); absent in older files, which are 64.
    #[serde(default = "super::arch::standard_width")]
    pub width: i64,
    /// Name of the linear head: `fc` (classifier logits) or `trans` (the stage-1 text-aligned projection).
    pub head: String,
    /// Outputs of the head: classes for `fc`, the token-embedding width for `trans`.
    pub out_dim: i64,
}

impl NetworkSpec {
    /// The backbone's shape.
    pub fn arch(&self) -> ResNetConfig {
        ResNetConfig {
            depth: self.depth,
            stem: self.stem,
            in_channels: self.in_channels,
            width: self.width,
        }
    }

    /// Builds the network under `root` with freshly initialised weights (load a checkpoint over them).
    pub fn build(&self, root: &nn::Path) -> ResNetWithHead {
        ResNetWithHead::new(root, &self.arch(), &self.head, self.out_dim)
    }
}

/// What a checkpoint is, beyond its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The stage that wrote it: `latent` (stage 1) or `detector` (stage 4).
    pub stage: String,
    pub network: NetworkSpec,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// The evaluation transform the network was trained for; `score` and `serve` apply exactly this.
    pub eval_transform: Pipeline,
    /// Completed training epochs.
    pub epoch: u64,
    /// Stage-specific facts (method, energy temperature, config hash, …), free-form JSON.
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The dream-ood version that wrote the file.
    #[serde(default)]
    pub writer: String,
}

impl CheckpointInfo {
    /// Info for `network` with the current writer version filled in.
    pub fn new(
        stage: &str,
        network: NetworkSpec,
        classes: Vec<String>,
        eval_transform: Pipeline,
    ) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            stage: stage.to_owned(),
            network,
            classes,
            eval_transform,
            epoch: 0,
            extra: Default::default(),
            writer: format!("dream-ood {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A tensor ready to be written: dtype, shape and little-endian bytes.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::tensor::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Copies a tensor to the CPU as float32 (or int64 for integer tensors) little-endian bytes.
fn to_raw(name: &str, t: &Tensor) -> Result<Raw> {
    let (kind, dtype) = match t.kind() {
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 | Kind::Bool => {
            (Kind::Int64, Dtype::I64)
        }
        _ => (Kind::Float, Dtype::F32),
    };
    let t = t
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_to_kind(kind))
        .and_then(|t| t.f_contiguous())
        .map_err(|e| Error::torch(format!("reading tensor `{name}` for the checkpoint"), e))?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel: usize = shape.iter().product();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)
        .map_err(|e| Error::torch(format!("copying tensor `{name}`"), e))?;
    Ok(Raw {
        dtype,
        shape,
        bytes,
    })
}

/// Writes named tensors and string metadata to `path` as safetensors, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_atomic(path, &encode_tensors(path, tensors, metadata)?)
}

/// The safetensors bytes of named tensors and metadata (`path` only names the file in errors).
pub fn encode_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let raws = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), to_raw(name, t)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(raws.iter().map(|(n, r)| (n, r)), Some(metadata))
        .map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: None,
            msg: format!("cannot serialise safetensors: {e}"),
        })?;
    Ok(bytes)
}

/// A safetensors file read whole: its tensors on the CPU (float32 or int64) and its string metadata.
#[derive(Debug)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

fn bad_file(path: &Path, msg: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line: None,
        msg,
    }
}

fn view_to_tensor(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor> {
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        other => {
            return Err(bad_file(
                path,
                format!("tensor `{name}` has dtype {other:?}; expected a float or integer dtype"),
            ));
        }
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let t = Tensor::f_from_data_size(view.data(), &shape, kind)
        .map_err(|e| Error::torch(format!("reading tensor `{name}` of {}", path.display()), e))?;
    let target = if matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        Kind::Float
    } else {
        Kind::Int64
    };
    t.f_to_kind(target)
        .map_err(|e| Error::torch(format!("converting tensor `{name}`"), e))
}

/// Reads every tensor and the metadata of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad_file(path, format!("not a safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad_file(path, format!("not a safetensors file: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        tensors.insert(name.to_owned(), view_to_tensor(path, name, &view)?);
    }
    Ok(TensorFile {
        tensors,
        metadata: header.metadata().clone().unwrap_or_default(),
    })
}

/// Parses the [`CheckpointInfo`] in a file's metadata; `None` when the file has none (PyTorch wrote it).
fn parse_info(path: &Path, metadata: &HashMap<String, String>) -> Result<Option<CheckpointInfo>> {
    let Some(json) = metadata.get(METADATA_KEY) else {
        return Ok(None);
    };
    let info: CheckpointInfo = serde_json::from_str(json).map_err(|e| {
        bad_file(
            path,
            format!("metadata `{METADATA_KEY}` is not a dream-ood checkpoint description: {e}"),
        )
    })?;
    if info.format_version > FORMAT_VERSION {
        return Err(bad_file(
            path,
            format!(
                "checkpoint format {} is newer than this dream-ood reads ({FORMAT_VERSION}); upgrade dream-ood",
                info.format_version
            ),
        ));
    }
    Ok(Some(info))
}

/// BatchNorm variables in a `VarStore` end in `running_var`; PyTorch's state_dict also has
/// `num_batches_tracked` beside them.
fn batch_norm_prefixes<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    names
        .filter_map(|n| n.strip_suffix(".running_var").map(str::to_owned))
        .collect()
}

/// Saves every variable of `vs` with `info` to `path` (atomically).
///
/// `num_batches_tracked` is written as 0 for each BatchNorm: libtorch's `tch` BatchNorm does not count
/// batches, and PyTorch reads the counter only when `momentum=None`, which these networks never use; it is
/// there so that PyTorch's strict `load_state_dict` accepts the file.
pub fn save(path: &Path, vs: &nn::VarStore, info: &CheckpointInfo) -> Result<()> {
    write_atomic(path, &encode(path, vs, info)?)
}

/// The bytes [`save`] writes.
pub fn encode(path: &Path, vs: &nn::VarStore, info: &CheckpointInfo) -> Result<Vec<u8>> {
    let vars = vs.variables();
    let mut tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    for prefix in batch_norm_prefixes(vars.keys()) {
        tensors.push((
            format!("{prefix}.num_batches_tracked"),
            Tensor::from(0i64).reshape([] as [i64; 0]),
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let json = serde_json::to_string(info).expect("checkpoint info is plain data");
    encode_tensors(
        path,
        &tensors,
        HashMap::from([(METADATA_KEY.to_owned(), json)]),
    )
}

/// Reads only the [`CheckpointInfo`] of a checkpoint (fails, naming the file, when it has none).
pub fn read_info(path: &Path) -> Result<CheckpointInfo> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 8];
    std::io::Read::read_exact(&mut &file, &mut head).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(head) as usize;
    if n > 100_000_000 {
        return Err(bad_file(
            path,
            "not a safetensors file (header size)".into(),
        ));
    }
    let mut header = vec![0u8; n];
    std::io::Read::read_exact(&mut &file, &mut header).map_err(|e| Error::io(path, e))?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| bad_file(path, format!("not a safetensors file: {e}")))?;
    parse_info(path, &header.metadata)?.ok_or_else(|| no_info(path))
}

fn no_info(path: &Path) -> Error {
    bad_file(
        path,
        format!(
            "has no `{METADATA_KEY}` metadata (a state_dict saved by PyTorch?); give the architecture \
             on the command line"
        ),
    )
}

/// Loads the tensors of `path` into `vs`, strictly: every variable of `vs` must be in the file with the
/// same shape, and the file may hold nothing else except `num_batches_tracked` counters. Returns the
/// file's [`CheckpointInfo`] when it has one.
pub fn load_into(path: &Path, vs: &mut nn::VarStore) -> Result<Option<CheckpointInfo>> {
    let file = read_tensors(path)?;
    let info = parse_info(path, &file.metadata)?;
    let vars = vs.variables();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, var) in &vars {
        match file.tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.size() != var.size() => mismatched.push(format!(
                "`{name}`: file {:?}, network {:?}",
                t.size(),
                var.size()
            )),
            Some(_) => {}
        }
    }
    let unexpected: Vec<&String> = file
        .tensors
        .keys()
        .filter(|n| !vars.contains_key(*n) && !n.ends_with(".num_batches_tracked"))
        .collect();
    if !missing.is_empty() || !mismatched.is_empty() || !unexpected.is_empty() {
        let mut msg = String::from("does not fit the network:");
        let list = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            let more = v.len().saturating_sub(5);
            let mut s = v.into_iter().take(5).collect::<Vec<_>>().join(", ");
            if more > 0 {
                s.push_str(&format!(" and {more} more"));
            }
            s
        };
        if !missing.is_empty() {
            msg.push_str(&format!(" missing {}.", list(&missing)));
        }
        if !mismatched.is_empty() {
            msg.push_str(&format!(" wrong shape {}.", list(&mismatched)));
        }
        if !unexpected.is_empty() {
            let u: Vec<String> = unexpected.into_iter().cloned().collect();
            msg.push_str(&format!(" unexpected {}.", list(&u)));
        }
        return Err(bad_file(path, msg));
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let src = &file.tensors[&name];
            var.f_copy_(&src.to_device(var.device()).to_kind(var.kind()))
                .map_err(|e| Error::torch(format!("loading `{name}`"), e))?;
        }
        Ok::<(), Error>(())
    })?;
    Ok(info)
}

/// Reads a checkpoint without libtorch's help for the graph: its info and its float tensors by name, as
/// the ONNX exporter takes them. `num_batches_tracked` counters are left out.
pub fn read_weights(path: &Path) -> Result<(Option<CheckpointInfo>, Weights)> {
    let file = read_tensors(path)?;
    let info = parse_info(path, &file.metadata)?;
    let mut weights = Weights::new();
    for (name, t) in file.tensors {
        if name.ends_with(".num_batches_tracked") {
            continue;
        }
        let dims: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let data = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1))
            .map_err(|e| Error::torch(format!("copying `{name}`"), e))?;
        weights.insert(name, NamedTensor { dims, data });
    }
    Ok((info, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NetworkSpec {
        NetworkSpec {
            depth: Depth::Resnet18,
            stem: Stem::Cifar,
            in_channels: 3,
            width: 64,
            head: "fc".into(),
            out_dim: 10,
        }
    }

    /// Deterministic, distinct values in every variable (no global RNG: tests run in parallel).
    fn fill(vs: &nn::VarStore, offset: f64) {
        tch::no_grad(|| {
            for (i, (_, mut t)) in vs.variables().into_iter().enumerate() {
                let n = t.numel() as i64;
                let v = Tensor::arange(n, (Kind::Float, tch::Device::Cpu))
                    .sin()
                    .g_mul_scalar(0.1)
                    .g_add_scalar(offset + i as f64 * 1e-3)
                    .reshape(t.size());
                t.copy_(&v);
            }
        });
    }

    #[test]
    fn network_spec_written_before_width_existed_reads_as_standard_width() {
        let old = r#"{"depth":"resnet18","stem":"cifar","in_channels":3,"head":"fc","out_dim":10}"#;
        let spec: NetworkSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.width, 64);
        assert_eq!(
            spec.build(&nn::VarStore::new(tch::Device::Cpu).root())
                .encoder
                .feature_dim(),
            512
        );
    }

    #[test]
    fn round_trip_keeps_every_tensor_and_the_info() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _net = spec().build(&vs.root());
        fill(&vs, 0.5);
        let mut info = CheckpointInfo::new(
            "detector",
            spec(),
            (0..10).map(|i| format!("c{i}")).collect(),
            Pipeline::cifar_test(),
        );
        info.epoch = 3;
        info.extra.insert("method".into(), "dream_ood".into());
        save(&path, &vs, &info).unwrap();

        let mut other = nn::VarStore::new(tch::Device::Cpu);
        let _net2 = spec().build(&other.root());
        let got = load_into(&path, &mut other).unwrap().unwrap();
        assert_eq!(got, info);
        assert_eq!(read_info(&path).unwrap(), info);
        let a = vs.variables();
        for (name, t) in other.variables() {
            assert!(t.equal(&a[&name]), "{name} differs after the round trip");
        }
        let (winfo, weights) = read_weights(&path).unwrap();
        assert_eq!(winfo.unwrap(), info);
        assert_eq!(weights.len(), a.len());
        let file = read_tensors(&path).unwrap();
        assert_eq!(
            file.tensors
                .keys()
                .filter(|k| k.ends_with("num_batches_tracked"))
                .count(),
            batch_norm_prefixes(a.keys()).len()
        );
    }

    #[test]
    fn a_checkpoint_of_another_network_is_refused_with_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _net = spec().build(&vs.root());
        save(
            &path,
            &vs,
            &CheckpointInfo::new("detector", spec(), vec![], Pipeline::cifar_test()),
        )
        .unwrap();
        let mut other = nn::VarStore::new(tch::Device::Cpu);
        let mut s = spec();
        s.out_dim = 7;
        s.head = "trans".into();
        let _net2 = s.build(&other.root());
        let err = load_into(&path, &mut other).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        assert!(
            err.contains("missing `trans.bias`") || err.contains("missing trans.bias"),
            "{err}"
        );
        assert!(err.contains("unexpected"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"definitely not safetensors").unwrap();
        let err = read_tensors(&path).unwrap_err().to_string();
        assert!(
            err.contains("junk.safetensors") && err.contains("not a safetensors"),
            "{err}"
        );
        assert!(read_info(&path).is_err());
    }
}
