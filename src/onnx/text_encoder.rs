//! Stage 3's edit of a Stable Diffusion text encoder: the token-embedding lookup becomes a graph input.
//!
//! Dream-OOD conditions Stable Diffusion on an outlier embedding `v` by running the CLIP text encoder with the
//! token embedding of the class's anchor token replaced by `v` (SPEC §3.1; the official code overwrites the
//! row in `ldm/modules/encoders/modules.py:L140-144`). An exported text encoder computes that lookup inside
//! the graph as `Gather(token_embedding.weight, input_ids)`. [`expose_token_embeddings`] removes that node
//! and feeds its consumers from a new input `inputs_embeds` `[batch, sequence, hidden]` instead; the caller
//! computes `W[ids]` from the token table (returned too) and overwrites the rows it wants.
//!
//! `input_ids` stays an input when the rest of the graph still reads it (CLIP's pooled output takes the
//! hidden state at the position of the highest id, the end-of-text token). Nodes and initializers that lose
//! every consumer (the token table itself) are pruned, so the edited graph is smaller than the original.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::builder::{Dim, ElemType, value_info};
use super::model::{tensor_dims, tensor_f32};
use super::proto::{GraphProto, ModelProto, NodeProto, TensorProto, tensor_proto};
use crate::error::{Error, Result};

/// The name of the new graph input.
pub const INPUTS_EMBEDS: &str = "inputs_embeds";
/// The name of the token-id input in SD exports (optimum, diffusers' conversion script).
pub const INPUT_IDS: &str = "input_ids";

/// The text encoder's token-embedding table `W` `[vocab, hidden]`, row-major, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTable {
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub data: Vec<f32>,
    /// Whether the model stores it in float16 (then `inputs_embeds` is float16 too).
    pub float16: bool,
}

impl TokenTable {
    /// The embedding row of one token id.
    pub fn row(&self, id: usize) -> Option<&[f32]> {
        (id < self.vocab_size)
            .then(|| &self.data[id * self.hidden_size..(id + 1) * self.hidden_size])
    }
}

/// The edited model and what the caller needs to use it.
#[derive(Debug, Clone)]
pub struct EmbeddingInputModel {
    pub model: ModelProto,
    pub table: TokenTable,
    /// Whether `input_ids` is still an input (it must then be fed too).
    pub keeps_input_ids: bool,
}

/// Ops through which token ids flow unchanged in value (only their type or layout changes). The lookup's
/// indices must reach `input_ids` through these alone, which rules out the position-embedding lookup (whose
/// indices depend on `input_ids` only through `Shape`).
const ID_PASSTHROUGH_OPS: &[&str] = &[
    "Cast",
    "Reshape",
    "Identity",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
];

/// Reads the text encoder's token table and returns the model with the lookup turned into an input.
/// `model_dir` resolves external data. Fails, naming what it found, when there is not exactly one
/// `Gather` of a 2-D initializer indexed by `input_ids`.
pub fn expose_token_embeddings(
    mut model: ModelProto,
    model_dir: &Path,
) -> Result<EmbeddingInputModel> {
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| onnx_err("model", "has no graph".to_owned()))?;
    if !graph.input.iter().any(|i| i.name() == INPUT_IDS) {
        let names: Vec<&str> = graph.input.iter().map(|i| i.name()).collect();
        return Err(onnx_err(
            "text encoder",
            format!("has no input `{INPUT_IDS}` (inputs: {names:?})"),
        ));
    }
    let initializers: HashMap<&str, &TensorProto> =
        graph.initializer.iter().map(|t| (t.name(), t)).collect();
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();

    let lookups: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type() == "Gather" && n.input.len() == 2)
        .filter(|(_, n)| {
            initializers
                .get(n.input[0].as_str())
                .is_some_and(|t| t.dims.len() == 2)
        })
        .filter(|(_, n)| indices_are_token_ids(&n.input[1], &producers))
        .map(|(i, _)| i)
        .collect();
    let lookup_index = match lookups.as_slice() {
        [one] => *one,
        [] => {
            return Err(onnx_err(
                "text encoder",
                format!(
                    "no Gather of a 2-D initializer indexed by `{INPUT_IDS}`; is this a CLIP text encoder?"
                ),
            ));
        }
        many => {
            let names: Vec<&str> = many
                .iter()
                .map(|&i| graph.node[i].input[0].as_str())
                .collect();
            return Err(onnx_err(
                "text encoder",
                format!("several token-embedding lookups: {names:?}"),
            ));
        }
    };
    let lookup = graph.node[lookup_index].clone();
    let table_tensor = initializers[lookup.input[0].as_str()];
    let dims = tensor_dims(table_tensor)?;
    let float16 = table_tensor.data_type() == tensor_proto::DataType::Float16 as i32;
    let table = TokenTable {
        name: table_tensor.name().to_owned(),
        vocab_size: dims[0],
        hidden_size: dims[1],
        data: tensor_f32(table_tensor, model_dir)?,
        float16,
    };
    drop(initializers);
    drop(producers);

    // Rewire: every reader of the lookup's output reads `inputs_embeds` instead.
    let old = lookup.output[0].clone();
    graph.node.remove(lookup_index);
    for node in &mut graph.node {
        for input in &mut node.input {
            if *input == old {
                *input = INPUTS_EMBEDS.to_owned();
            }
        }
    }
    for output in &mut graph.output {
        if output.name() == old {
            output.name = Some(INPUTS_EMBEDS.to_owned());
        }
    }
    let elem = if float16 {
        ElemType::Float16
    } else {
        ElemType::Float
    };
    let dims = [
        Dim::named("batch"),
        Dim::named("sequence"),
        Dim::Fixed(table.hidden_size as i64),
    ];
    graph.input.push(value_info(INPUTS_EMBEDS, elem, &dims));

    prune_dead(graph);
    let keeps_input_ids = graph
        .node
        .iter()
        .any(|n| n.input.iter().any(|i| i == INPUT_IDS));
    if !keeps_input_ids {
        graph.input.retain(|i| i.name() != INPUT_IDS);
    }
    Ok(EmbeddingInputModel {
        model,
        table,
        keeps_input_ids,
    })
}

/// Whether `name` is `input_ids` itself or computed from it by [`ID_PASSTHROUGH_OPS`] alone.
fn indices_are_token_ids(name: &str, producers: &HashMap<&str, &NodeProto>) -> bool {
    let mut current = name;
    for _ in 0..16 {
        if current == INPUT_IDS {
            return true;
        }
        match producers.get(current) {
            Some(node)
                if ID_PASSTHROUGH_OPS.contains(&node.op_type()) && !node.input.is_empty() =>
            {
                current = &node.input[0];
            }
            _ => return false,
        }
    }
    false
}

/// Removes nodes none of whose outputs are read (repeatedly), then initializers nobody reads, then value
/// infos of values that no longer exist.
fn prune_dead(graph: &mut GraphProto) {
    loop {
        let mut used: HashSet<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
        for node in &graph.node {
            used.extend(node.input.iter().cloned());
            // Subgraphs (If, Loop) read outer values by name too.
            for attr in &node.attribute {
                for sub in attr.g.iter().chain(attr.graphs.iter()) {
                    collect_subgraph_inputs(sub, &mut used);
                }
            }
        }
        let before = graph.node.len();
        graph
            .node
            .retain(|n| n.output.iter().any(|o| used.contains(o)));
        if graph.node.len() == before {
            graph.initializer.retain(|t| used.contains(t.name()));
            let produced: HashSet<&str> = graph
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str))
                .collect();
            graph.value_info.retain(|v| produced.contains(v.name()));
            return;
        }
    }
}

fn collect_subgraph_inputs(graph: &GraphProto, used: &mut HashSet<String>) {
    for node in &graph.node {
        used.extend(node.input.iter().cloned());
        for attr in &node.attribute {
            for sub in attr.g.iter().chain(attr.graphs.iter()) {
                collect_subgraph_inputs(sub, used);
            }
        }
    }
}

fn onnx_err(what: &str, msg: String) -> Error {
    Error::Onnx {
        what: what.to_owned(),
        msg,
    }
}
