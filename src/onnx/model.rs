//! Reading and writing `.onnx` files, and reading initializer data.
//!
//! Models above 2 GB keep their weights in external data files (`model.onnx_data`, `weights.pb`) that the
//! `TensorProto` points to with `location` / `offset` / `length`; [`tensor_f32`] follows those pointers,
//! relative to the model's folder, as ONNX Runtime does.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{ModelProto, TensorProto, ValueInfoProto, tensor_proto};
use crate::error::{Error, Result};
use crate::files::write_atomic;

/// Reads and decodes an ONNX model file (weights held in external files stay there).
pub fn load_model(path: &Path) -> Result<ModelProto> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    ModelProto::decode(bytes.as_slice()).map_err(|e| Error::Onnx {
        what: path.display().to_string(),
        msg: format!("not a valid ONNX model: {e}"),
    })
}

/// Encodes a model into bytes.
pub fn encode_model(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Writes a model atomically: into a temporary file beside `path`, then renamed over it.
pub fn save_model(model: &ModelProto, path: &Path) -> Result<()> {
    write_atomic(path, &encode_model(model))
}

/// The dims of a tensor as `usize`, rejecting negative ones.
pub fn tensor_dims(tensor: &TensorProto) -> Result<Vec<usize>> {
    tensor
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| Error::Onnx {
                what: format!("tensor `{}`", tensor.name()),
                msg: format!("negative dimension {d} in {:?}", tensor.dims),
            })
        })
        .collect()
}

/// The values of a float32 or float16 tensor as f32, from inline data or an external data file (resolved
/// against `model_dir`).
pub fn tensor_f32(tensor: &TensorProto, model_dir: &Path) -> Result<Vec<f32>> {
    let what = || format!("tensor `{}`", tensor.name());
    let count: usize = tensor_dims(tensor)?.iter().product();
    let elem = tensor_proto::DataType::try_from(tensor.data_type()).ok();
    let width = match elem {
        Some(tensor_proto::DataType::Float) => 4,
        Some(tensor_proto::DataType::Float16) => 2,
        _ => {
            return Err(Error::Onnx {
                what: what(),
                msg: format!(
                    "expected float32 or float16 data, found data type {}",
                    tensor.data_type()
                ),
            });
        }
    };
    let raw: Vec<u8> = if tensor.data_location() == tensor_proto::DataLocation::External {
        read_external(tensor, model_dir, count * width)?
    } else if !tensor.raw_data().is_empty() {
        tensor.raw_data().to_vec()
    } else if width == 4 {
        // Typed storage: float_data holds the floats themselves.
        return check_count(tensor.float_data.clone(), count, &what());
    } else {
        // float16 in typed storage: int32_data holds the bit patterns, one per element.
        let values = tensor
            .int32_data
            .iter()
            .map(|&b| half::f16::from_bits(b as u16).to_f32())
            .collect();
        return check_count(values, count, &what());
    };
    if raw.len() != count * width {
        return Err(Error::Onnx {
            what: what(),
            msg: format!(
                "holds {} bytes, expected {} ({count} values of {width} bytes)",
                raw.len(),
                count * width
            ),
        });
    }
    Ok(if width == 4 {
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        raw.chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    })
}

fn check_count(values: Vec<f32>, count: usize, what: &str) -> Result<Vec<f32>> {
    if values.len() == count {
        Ok(values)
    } else {
        Err(Error::Onnx {
            what: what.to_owned(),
            msg: format!("holds {} values, its dims say {count}", values.len()),
        })
    }
}

/// Reads `len` bytes of an externally stored tensor.
fn read_external(tensor: &TensorProto, model_dir: &Path, len: usize) -> Result<Vec<u8>> {
    let what = format!("tensor `{}`", tensor.name());
    let field = |key: &str| {
        tensor
            .external_data
            .iter()
            .find(|e| e.key() == key)
            .map(|e| e.value().to_owned())
    };
    let location = field("location").ok_or_else(|| Error::Onnx {
        what: what.clone(),
        msg: "external data without a `location`".to_owned(),
    })?;
    let parse = |key: &str| -> Result<Option<u64>> {
        field(key)
            .map(|v| {
                v.parse().map_err(|_| Error::Onnx {
                    what: what.clone(),
                    msg: format!("external data `{key}` is not a number: {v:?}"),
                })
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    if let Some(stored) = parse("length")?
        && stored != len as u64
    {
        return Err(Error::Onnx {
            what,
            msg: format!("external data length {stored} bytes, its dims and type need {len}"),
        });
    }
    let path: PathBuf = model_dir.join(&location);
    let mut file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(&path, e))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
    Ok(buf)
}

/// A graph input as a model file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredInput {
    pub name: String,
    /// One entry per axis: `Some(n)` fixed, `None` dynamic (a named `dim_param`, or no value). Empty for a
    /// scalar; `None` as a whole when the model declares no shape (rank unknown).
    pub dims: Option<Vec<Option<i64>>>,
}

impl DeclaredInput {
    fn from_proto(info: &ValueInfoProto) -> DeclaredInput {
        use super::proto::{tensor_shape_proto::dimension::Value as DimValue, type_proto};
        let shape = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            _ => None,
        };
        DeclaredInput {
            name: info.name().to_owned(),
            dims: shape.map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(DimValue::DimValue(n)) if n >= 0 => Some(n),
                        _ => None,
                    })
                    .collect()
            }),
        }
    }
}

/// The graph inputs of an ONNX model file, without decoding the rest of it.
///
/// Why not [`load_model`]: an fp16 UNet keeps 1.7 GB of weights inside `model.onnx`, and all that is needed
/// here (the names and dynamic axes, to make TensorRT profiles before a session exists) is a few hundred
/// bytes. The reader walks the protobuf wire format: `ModelProto.graph` (field 7), inside it every
/// `GraphProto.input` (field 11) is decoded and every other field (nodes, initializers) is skipped by seeking.
pub fn declared_inputs(path: &Path) -> Result<Vec<DeclaredInput>> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    scan_graph_inputs(std::io::BufReader::new(file)).map_err(|e| match e {
        ScanError::Io(e) => Error::io(path, e),
        ScanError::Format(msg) => Error::Onnx {
            what: path.display().to_string(),
            msg: format!("not a valid ONNX model: {msg}"),
        },
    })
}

/// [`declared_inputs`] of a model held in memory; `what` names it in errors.
pub fn declared_inputs_of_bytes(bytes: &[u8], what: &str) -> Result<Vec<DeclaredInput>> {
    scan_graph_inputs(std::io::Cursor::new(bytes)).map_err(|e| Error::Onnx {
        what: what.to_owned(),
        msg: match e {
            ScanError::Io(e) => format!("not a valid ONNX model: {e}"),
            ScanError::Format(msg) => format!("not a valid ONNX model: {msg}"),
        },
    })
}

enum ScanError {
    Io(std::io::Error),
    Format(String),
}

impl From<std::io::Error> for ScanError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ScanError::Format("truncated".to_owned())
        } else {
            ScanError::Io(e)
        }
    }
}

/// Protobuf field numbers: `ModelProto.graph`, `GraphProto.input` (onnx.proto).
const MODEL_GRAPH: u64 = 7;
const GRAPH_INPUT: u64 = 11;
/// Protobuf wire types.
const WIRE_VARINT: u64 = 0;
const WIRE_I64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_I32: u64 = 5;

fn scan_graph_inputs<R: Read + Seek>(
    mut r: R,
) -> std::result::Result<Vec<DeclaredInput>, ScanError> {
    let end = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let mut inputs = Vec::new();
    let mut pos = 0u64;
    while pos < end {
        let (field, wire) = read_tag(&mut r, &mut pos)?;
        if field == MODEL_GRAPH && wire == WIRE_LEN {
            let len = read_varint(&mut r, &mut pos)?;
            let graph_end = pos.checked_add(len).filter(|&e| e <= end).ok_or_else(|| {
                ScanError::Format("the graph runs past the end of the file".to_owned())
            })?;
            while pos < graph_end {
                let (field, wire) = read_tag(&mut r, &mut pos)?;
                if field == GRAPH_INPUT && wire == WIRE_LEN {
                    let len = read_varint(&mut r, &mut pos)?;
                    let mut buf = vec![
                        0u8;
                        usize::try_from(len).map_err(|_| ScanError::Format(
                            "input too large".to_owned()
                        ))?
                    ];
                    r.read_exact(&mut buf)?;
                    pos += len;
                    let info = ValueInfoProto::decode(buf.as_slice())
                        .map_err(|e| ScanError::Format(format!("graph input: {e}")))?;
                    inputs.push(DeclaredInput::from_proto(&info));
                } else {
                    skip_field(&mut r, &mut pos, wire)?;
                }
            }
            if pos != graph_end {
                return Err(ScanError::Format(
                    "a graph field overruns the graph".to_owned(),
                ));
            }
        } else {
            skip_field(&mut r, &mut pos, wire)?;
        }
    }
    if pos != end {
        return Err(ScanError::Format(
            "a field overruns the end of the file".to_owned(),
        ));
    }
    Ok(inputs)
}

fn read_varint<R: Read>(r: &mut R, pos: &mut u64) -> std::result::Result<u64, ScanError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8];
        r.read_exact(&mut byte)?;
        *pos += 1;
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ScanError::Format(
        "a varint longer than 10 bytes".to_owned(),
    ))
}

/// `(field number, wire type)` of the next field.
fn read_tag<R: Read>(r: &mut R, pos: &mut u64) -> std::result::Result<(u64, u64), ScanError> {
    let tag = read_varint(r, pos)?;
    Ok((tag >> 3, tag & 7))
}

fn skip_field<R: Read + Seek>(
    r: &mut R,
    pos: &mut u64,
    wire: u64,
) -> std::result::Result<(), ScanError> {
    let len = match wire {
        WIRE_VARINT => {
            read_varint(r, pos)?;
            return Ok(());
        }
        WIRE_I64 => 8,
        WIRE_LEN => read_varint(r, pos)?,
        WIRE_I32 => 4,
        other => return Err(ScanError::Format(format!("unsupported wire type {other}"))),
    };
    let offset = i64::try_from(len).map_err(|_| ScanError::Format("field too large".to_owned()))?;
    r.seek(SeekFrom::Current(offset))?;
    *pos += len;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::StringStringEntryProto;

    fn float_tensor(name: &str, dims: &[i64]) -> TensorProto {
        TensorProto {
            name: Some(name.to_owned()),
            dims: dims.to_vec(),
            data_type: Some(tensor_proto::DataType::Float as i32),
            ..Default::default()
        }
    }

    #[test]
    fn reads_raw_typed_and_half_data() {
        let dir = Path::new(".");
        let mut t = float_tensor("w", &[2, 2]);
        t.raw_data = Some(
            [1.0f32, -2.0, 0.5, 8.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
        assert_eq!(tensor_f32(&t, dir).unwrap(), [1.0, -2.0, 0.5, 8.0]);

        let mut t = float_tensor("w", &[3]);
        t.float_data = vec![3.0, 4.0, 5.0];
        assert_eq!(tensor_f32(&t, dir).unwrap(), [3.0, 4.0, 5.0]);

        let mut t = float_tensor("h", &[2]);
        t.data_type = Some(tensor_proto::DataType::Float16 as i32);
        t.raw_data = Some(
            [half::f16::from_f32(1.5), half::f16::from_f32(-0.25)]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
        assert_eq!(tensor_f32(&t, dir).unwrap(), [1.5, -0.25]);
    }

    #[test]
    fn wrong_size_and_type_are_errors_naming_the_tensor() {
        let mut t = float_tensor("token_embedding", &[2, 2]);
        t.raw_data = Some(vec![0; 12]);
        let err = tensor_f32(&t, Path::new(".")).unwrap_err().to_string();
        assert_eq!(
            err,
            "tensor `token_embedding`: holds 12 bytes, expected 16 (4 values of 4 bytes)"
        );
        t.data_type = Some(tensor_proto::DataType::Int64 as i32);
        let err = tensor_f32(&t, Path::new(".")).unwrap_err().to_string();
        assert_eq!(
            err,
            "tensor `token_embedding`: expected float32 or float16 data, found data type 7"
        );
    }

    #[test]
    fn reads_external_data_at_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0xAAu8; 8];
        bytes.extend([7.0f32, 9.0].iter().flat_map(|v| v.to_le_bytes()));
        fs::write(dir.path().join("model.onnx_data"), &bytes).unwrap();
        let mut t = float_tensor("w", &[2]);
        t.data_location = Some(tensor_proto::DataLocation::External as i32);
        let entry = |k: &str, v: &str| StringStringEntryProto {
            key: Some(k.to_owned()),
            value: Some(v.to_owned()),
        };
        t.external_data = vec![
            entry("location", "model.onnx_data"),
            entry("offset", "8"),
            entry("length", "8"),
        ];
        assert_eq!(tensor_f32(&t, dir.path()).unwrap(), [7.0, 9.0]);
        t.external_data[0] = entry("location", "missing.bin");
        let err = tensor_f32(&t, dir.path()).unwrap_err().to_string();
        assert!(err.contains("missing.bin: No such file"), "{err}");
    }

    #[test]
    fn save_is_atomic_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let mut model = ModelProto {
            ir_version: Some(8),
            ..Default::default()
        };
        save_model(&model, &path).unwrap();
        model.producer_name = Some("dream-ood".to_owned());
        save_model(&model, &path).unwrap();
        assert_eq!(load_model(&path).unwrap(), model);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["m.onnx"]);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.onnx");
        fs::write(&path, b"\xff\xff\xff not protobuf").unwrap();
        let err = load_model(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: not a valid ONNX model", path.display())),
            "{err}"
        );
    }

    /// A UNet-like graph: inputs with named, fixed and missing dims, a scalar, an int32 input, and an
    /// initializer and nodes in front of the inputs (prost writes fields in number order) to skip.
    fn model_with_inputs() -> ModelProto {
        use crate::onnx::builder::{Dim, ElemType, GraphBuilder};
        let mut g = GraphBuilder::new("unet");
        g.input(
            "sample",
            ElemType::Float16,
            &[
                Dim::named("batch"),
                Dim::Fixed(4),
                Dim::named("h"),
                Dim::named("w"),
            ],
        );
        g.input("timestep", ElemType::Float, &[]);
        g.input(
            "input_ids",
            ElemType::Int32,
            &[Dim::named("batch"), Dim::Fixed(77)],
        );
        g.initializer_f32("w", &[1000], &[0.5; 1000]);
        g.node("Add", &["sample", "w"], &["out_sample"], vec![]);
        g.output("out_sample", ElemType::Float16, &[Dim::named("batch")]);
        let mut model = g.into_model(17, &[]);
        let graph = model.graph.as_mut().unwrap();
        // A dimension with neither a value nor a name, and an input with no shape at all.
        fn shape_mut(
            info: &mut crate::onnx::proto::ValueInfoProto,
        ) -> &mut Option<crate::onnx::proto::TensorShapeProto> {
            match info.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                Some(crate::onnx::proto::type_proto::Value::TensorType(t)) => &mut t.shape,
                _ => unreachable!("the builder writes tensor types"),
            }
        }
        shape_mut(&mut graph.input[0]).as_mut().unwrap().dim[2].value = None;
        let mut no_shape = graph.input[1].clone();
        no_shape.name = Some("mystery".to_owned());
        *shape_mut(&mut no_shape) = None;
        graph.input.push(no_shape);
        model
    }

    #[test]
    fn declared_inputs_read_names_and_dynamic_axes_without_decoding_the_rest() {
        let want = vec![
            DeclaredInput {
                name: "sample".to_owned(),
                dims: Some(vec![None, Some(4), None, None]),
            },
            DeclaredInput {
                name: "timestep".to_owned(),
                dims: Some(vec![]),
            },
            DeclaredInput {
                name: "input_ids".to_owned(),
                dims: Some(vec![None, Some(77)]),
            },
            DeclaredInput {
                name: "mystery".to_owned(),
                dims: None,
            },
        ];
        let bytes = encode_model(&model_with_inputs());
        assert_eq!(declared_inputs_of_bytes(&bytes, "m").unwrap(), want);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        fs::write(&path, &bytes).unwrap();
        assert_eq!(declared_inputs(&path).unwrap(), want);
    }

    #[test]
    fn declared_inputs_of_a_cut_file_is_an_error() {
        let bytes = encode_model(&model_with_inputs());
        for cut in [bytes.len() - 1, bytes.len() / 2, 3] {
            let err = declared_inputs_of_bytes(&bytes[..cut], "unet/model.onnx")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("unet/model.onnx: not a valid ONNX model"),
                "cut at {cut}: {err}"
            );
        }
        assert_eq!(declared_inputs_of_bytes(&[], "empty").unwrap(), vec![]);
    }
}
