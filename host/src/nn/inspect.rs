//! What the host checks in an ONNX model before ONNX Runtime sees it.
//!
//! - **External data.** A tensor stored outside the model file is read by ONNX Runtime
//!   from a path the model names, relative to the process's working directory for a
//!   model given as bytes: a guest could read host files as tensor data. Lepton keeps
//!   each model as one content-addressed file, so no model may use external data.
//! - **Operators of uploaded models.** A model a guest uploads (`wasi:nn` `load` from
//!   bytes) may use only the operators in [`UPLOAD_OPERATORS`] of the default ONNX
//!   domain: none whose output size comes from a tensor's *values* or an attribute
//!   (`ConstantOfShape`, `Expand`, `Tile`, `Range`, `Resize`, `Pad`, random generators,
//!   `ConvTranspose`), and no control flow (`Loop`, `Scan`, `If`). Each allowed operator's
//!   output is bounded by its inputs, but those bounds multiply through a graph: what
//!   uploaded models allocate is capped by the arena they share
//!   ([`super::onnx::UPLOAD_ARENA_BYTES`]).
//!   Models in the manifest are the operator's and are not restricted.

use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto};
use prost::Message as _;

/// Operators an uploaded model may use (default ONNX domain): element-wise maths,
/// activations, matrix products, convolutions and pooling, normalisation, reductions,
/// and shape operators whose output is no larger than their input.
pub const UPLOAD_OPERATORS: &[&str] = &[
    "Abs",
    "Acos",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "Asin",
    "Atan",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Celu",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "Cos",
    "Cosh",
    "DequantizeLinear",
    "Div",
    "Dropout",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GreaterOrEqual",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mish",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "PRelu",
    "Pow",
    "QuantizeLinear",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Round",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Size",
    "Slice",
    "Softmax",
    "Softplus",
    "Softsign",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tan",
    "Tanh",
    "ThresholdedRelu",
    "TopK",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
];

/// Refuses a model that stores any tensor outside its file; for an `uploaded` model,
/// also one that uses an operator outside [`UPLOAD_OPERATORS`] or local functions.
pub fn check(bytes: &[u8], uploaded: bool) -> Result<(), String> {
    let model = ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    if uploaded && !model.functions.is_empty() {
        return Err("an uploaded model may not define functions".into());
    }
    for function in &model.functions {
        nodes(&function.node, uploaded)?;
    }
    if let Some(graph) = &model.graph {
        self::graph(graph, uploaded)?;
    }
    Ok(())
}

fn graph(graph: &GraphProto, uploaded: bool) -> Result<(), String> {
    graph.initializer.iter().try_for_each(tensor)?;
    graph.sparse_initializer.iter().try_for_each(sparse)?;
    nodes(&graph.node, uploaded)
}

fn nodes(nodes: &[NodeProto], uploaded: bool) -> Result<(), String> {
    for node in nodes {
        if uploaded {
            let domain_ok = node.domain.is_empty() || node.domain == "ai.onnx";
            if !domain_ok || !UPLOAD_OPERATORS.contains(&node.op_type.as_str()) {
                let op = if node.domain.is_empty() {
                    node.op_type.clone()
                } else {
                    format!("{}:{}", node.domain, node.op_type)
                };
                return Err(format!(
                    "operator `{op}` is not allowed in an uploaded model (its output size or run time is not bounded by its inputs)"
                ));
            }
        }
        for attribute in &node.attribute {
            attribute.t.iter().try_for_each(tensor)?;
            attribute.tensors.iter().try_for_each(tensor)?;
            attribute.sparse_tensor.iter().try_for_each(sparse)?;
            attribute.sparse_tensors.iter().try_for_each(sparse)?;
            for g in attribute.g.iter().chain(&attribute.graphs) {
                graph(g, uploaded)?;
            }
        }
    }
    Ok(())
}

fn sparse(sparse: &SparseTensorProto) -> Result<(), String> {
    sparse
        .values
        .iter()
        .chain(&sparse.indices)
        .try_for_each(tensor)
}

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

fn tensor(tensor: &TensorProto) -> Result<(), String> {
    if tensor.data_location == EXTERNAL || !tensor.external_data.is_empty() {
        let location = tensor
            .external_data
            .iter()
            .find(|entry| entry.key == "location")
            .map_or("?", |entry| entry.value.as_str());
        return Err(format!(
            "tensor `{}` keeps its data outside the model (external data at `{location}`); \
             embed the weights in the model file (`onnx.save(model, path, save_as_external_data=False)`)",
            tensor.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_onnx::onnx::{
        AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
    };
    use prost::Message as _;

    fn model(nodes: Vec<NodeProto>, initializer: Vec<TensorProto>) -> Vec<u8> {
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                initializer,
                ..GraphProto::default()
            }),
            ..ModelProto::default()
        }
        .encode_to_vec()
    }

    fn node(op: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            ..NodeProto::default()
        }
    }

    fn external(location: &str) -> TensorProto {
        TensorProto {
            name: "w".into(),
            data_location: 1,
            external_data: vec![StringStringEntryProto {
                key: "location".into(),
                value: location.into(),
            }],
            ..TensorProto::default()
        }
    }

    #[test]
    fn external_data_is_refused_wherever_it_hides() {
        let top = model(vec![node("Add")], vec![external("secret.txt")]);
        let error = super::check(&top, false).expect_err("refused");
        assert!(error.contains("`secret.txt`"), "{error}");
        // In a Constant's attribute, inside a subgraph of an attribute.
        let mut constant = node("Constant");
        constant.attribute.push(AttributeProto {
            t: Some(external("/etc/passwd")),
            ..AttributeProto::default()
        });
        let mut holder = node("Identity");
        holder.attribute.push(AttributeProto {
            g: Some(GraphProto {
                node: vec![constant],
                ..GraphProto::default()
            }),
            ..AttributeProto::default()
        });
        assert!(super::check(&model(vec![holder], vec![]), false).is_err());
        // A location entry alone, without the flag, is refused too.
        let mut sneaky = external("x");
        sneaky.data_location = 0;
        assert!(super::check(&model(vec![], vec![sneaky]), false).is_err());
        assert!(super::check(&model(vec![node("Add")], vec![]), false).is_ok());
    }

    #[test]
    fn uploads_may_use_only_bounded_operators() {
        for op in [
            "ConstantOfShape",
            "Loop",
            "Expand",
            "Tile",
            "Range",
            "Resize",
            "If",
        ] {
            let error = super::check(&model(vec![node(op)], vec![]), true).expect_err(op);
            assert!(error.contains(op), "{error}");
            assert!(super::check(&model(vec![node(op)], vec![]), false).is_ok());
        }
        let mut contrib = node("Add");
        contrib.domain = "com.microsoft".into();
        assert!(super::check(&model(vec![contrib], vec![]), true).is_err());
        assert!(super::check(&model(vec![node("MatMul"), node("Relu")], vec![]), true).is_ok());
        assert!(super::check(b"\xff\xff garbage", true).is_err());
    }
}
