//! A small builder for ONNX graphs: named initializers, nodes, typed inputs and outputs with dynamic axes,
//! and model metadata. Enough to export dream-ood's own networks; not a general ONNX authoring library.
//!
//! ```
//! use dream_ood::onnx::builder::{Dim, GraphBuilder, ElemType};
//! let mut g = GraphBuilder::new("affine");
//! g.input("x", ElemType::Float, &[Dim::named("batch"), Dim::Fixed(2)]);
//! g.initializer_f32("w", &[2, 1], &[0.5, -1.0]);
//! g.node("MatMul", &["x", "w"], &["y"], vec![]);
//! g.output("y", ElemType::Float, &[Dim::named("batch"), Dim::Fixed(1)]);
//! let model = g.into_model(17, &[("score", "energy")]);
//! assert_eq!(model.graph.unwrap().node.len(), 1);
//! ```

use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto, tensor_proto,
    tensor_shape_proto, type_proto,
};

/// IR version written: 8 is what ONNX Runtime 1.x and onnx 1.10+ all read, and it covers opset 17-18.
pub const IR_VERSION: i64 = 8;

/// Element types dream-ood writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    Float,
    Float16,
    Uint8,
    Int32,
    Int64,
    Bool,
}

impl ElemType {
    fn data_type(self) -> i32 {
        use tensor_proto::DataType;
        (match self {
            ElemType::Float => DataType::Float,
            ElemType::Float16 => DataType::Float16,
            ElemType::Uint8 => DataType::Uint8,
            ElemType::Int32 => DataType::Int32,
            ElemType::Int64 => DataType::Int64,
            ElemType::Bool => DataType::Bool,
        }) as i32
    }
}

/// One dimension of an input or output: fixed, or a named dynamic axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Named(String),
}

impl Dim {
    pub fn named(name: &str) -> Dim {
        Dim::Named(name.to_owned())
    }
}

/// Builds a `GraphProto`, then a `ModelProto`.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: Some(name.to_owned()),
                ..Default::default()
            },
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: ElemType, dims: &[Dim]) -> &mut Self {
        self.graph.input.push(value_info(name, elem, dims));
        self
    }

    /// Declares a graph output.
    pub fn output(&mut self, name: &str, elem: ElemType, dims: &[Dim]) -> &mut Self {
        self.graph.output.push(value_info(name, elem, dims));
        self
    }

    /// Adds a float32 initializer (little-endian raw data).
    pub fn initializer_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> &mut Self {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph
            .initializer
            .push(tensor(name, ElemType::Float, dims, raw));
        self
    }

    /// Adds an int64 initializer (shapes, axes, indices).
    pub fn initializer_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> &mut Self {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph
            .initializer
            .push(tensor(name, ElemType::Int64, dims, raw));
        self
    }

    /// Adds a node of the default domain; its name is its first output, which is unique in a valid graph.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> &mut Self {
        self.graph.node.push(NodeProto {
            name: outputs.first().map(|o| o.to_string()),
            op_type: Some(op_type.to_owned()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attributes,
            ..Default::default()
        });
        self
    }

    /// Finishes the model with the default-domain opset and `metadata_props`.
    pub fn into_model(self, opset: i64, metadata: &[(&str, &str)]) -> ModelProto {
        ModelProto {
            ir_version: Some(IR_VERSION),
            producer_name: Some("dream-ood".to_owned()),
            producer_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: Some(k.to_string()),
                    value: Some(v.to_string()),
                })
                .collect(),
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}

/// A typed tensor value description.
pub fn value_info(name: &str, elem: ElemType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Named(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem.data_type()),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tensor(name: &str, elem: ElemType, dims: &[i64], raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims: dims.to_vec(),
        data_type: Some(elem.data_type()),
        raw_data: Some(raw_data),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(attribute_proto::AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(attribute_proto::AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A float attribute.
pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(attribute_proto::AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}
