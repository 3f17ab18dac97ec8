//! Tiny ONNX models written byte by byte (protobuf), so the tests need no model
//! files and no Python: a graph of `Identity` nodes, one per input.

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn int_field(out: &mut Vec<u8>, field: u64, value: u64) {
    varint(out, field << 3);
    varint(out, value);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// ONNX `TensorProto.DataType` codes of the wasi-nn types.
pub fn onnx_type(wasi_type: &str) -> u64 {
    match wasi_type {
        "FP32" => 1,
        "U8" => 2,
        "I32" => 6,
        "I64" => 7,
        "FP16" => 10,
        "FP64" => 11,
        "BF16" => 16,
        other => panic!("no ONNX type for {other}"),
    }
}

/// `ValueInfoProto` of a tensor; `None` dimensions are symbolic (`N`).
fn value_info(name: &str, elem_type: u64, dims: &[Option<i64>]) -> Vec<u8> {
    let mut shape = Vec::new();
    for dim in dims {
        let mut d = Vec::new();
        match dim {
            Some(n) => int_field(&mut d, 1, *n as u64),
            None => bytes_field(&mut d, 2, b"N"),
        }
        bytes_field(&mut shape, 1, &d);
    }
    let mut tensor_type = Vec::new();
    int_field(&mut tensor_type, 1, elem_type);
    bytes_field(&mut tensor_type, 2, &shape);
    let mut type_proto = Vec::new();
    bytes_field(&mut type_proto, 1, &tensor_type);
    let mut info = Vec::new();
    bytes_field(&mut info, 1, name.as_bytes());
    bytes_field(&mut info, 2, &type_proto);
    info
}

/// A `ModelProto` (IR version 8, opset 17) around an encoded `GraphProto`.
fn model_proto(graph: &[u8]) -> Vec<u8> {
    let mut opset = Vec::new();
    bytes_field(&mut opset, 1, b"");
    int_field(&mut opset, 2, 17);
    let mut model = Vec::new();
    int_field(&mut model, 1, 8); // ir_version
    bytes_field(&mut model, 8, &opset);
    bytes_field(&mut model, 7, graph);
    model
}

/// A model with, for each `(input, wasi type)`, an `Identity` node to output `out_<input>`
/// of the same type; every input has shape `[N, width]`.
pub fn identity_model(inputs: &[(&str, &str)], width: i64) -> Vec<u8> {
    let mut graph = Vec::new();
    for (name, _) in inputs {
        let mut node = Vec::new();
        bytes_field(&mut node, 1, name.as_bytes());
        bytes_field(&mut node, 2, format!("out_{name}").as_bytes());
        bytes_field(&mut node, 3, format!("identity_{name}").as_bytes());
        bytes_field(&mut node, 4, b"Identity");
        bytes_field(&mut graph, 1, &node);
    }
    bytes_field(&mut graph, 2, b"identity");
    for (name, ty) in inputs {
        bytes_field(
            &mut graph,
            11,
            &value_info(name, onnx_type(ty), &[None, Some(width)]),
        );
    }
    for (name, ty) in inputs {
        bytes_field(
            &mut graph,
            12,
            &value_info(&format!("out_{name}"), onnx_type(ty), &[None, Some(width)]),
        );
    }
    model_proto(&graph)
}

/// An INT `AttributeProto` `name = value`.
fn int_attribute(name: &str, value: i64) -> Vec<u8> {
    let mut attribute = Vec::new();
    bytes_field(&mut attribute, 1, name.as_bytes());
    int_field(&mut attribute, 3, value as u64); // i
    int_field(&mut attribute, 20, 2); // type: INT
    attribute
}

/// A one-node graph `op(x) -> y` over FLOAT `[N, 4]`, with optional float
/// initializers (name, length) appended, e.g. to test what a trainer refuses.
pub fn one_node_model(
    op: &str,
    node_name: &str,
    int_attributes: &[(&str, i64)],
    initializers: &[(&str, usize)],
) -> Vec<u8> {
    let mut graph = Vec::new();
    let mut node = Vec::new();
    bytes_field(&mut node, 1, b"x");
    bytes_field(&mut node, 2, b"y");
    bytes_field(&mut node, 3, node_name.as_bytes());
    bytes_field(&mut node, 4, op.as_bytes());
    for (name, value) in int_attributes {
        bytes_field(&mut node, 5, &int_attribute(name, *value));
    }
    bytes_field(&mut graph, 1, &node);
    bytes_field(&mut graph, 2, b"one-node");
    for (name, len) in initializers {
        let mut tensor = Vec::new();
        int_field(&mut tensor, 1, *len as u64); // dims
        int_field(&mut tensor, 2, 1); // data_type: FLOAT
        bytes_field(&mut tensor, 8, name.as_bytes());
        bytes_field(&mut tensor, 9, &vec![0u8; len * 4]); // raw_data
        bytes_field(&mut graph, 5, &tensor);
    }
    bytes_field(&mut graph, 11, &value_info("x", 1, &[None, Some(4)]));
    bytes_field(&mut graph, 12, &value_info("y", 1, &[None, Some(4)]));
    model_proto(&graph)
}

/// A model whose only initializer `w` (UINT8 `[len]`) keeps its data in the file at
/// `location` (ONNX external data), passed through to the output `y`.
pub fn external_data_model(location: &str, len: usize) -> Vec<u8> {
    let mut tensor = Vec::new();
    int_field(&mut tensor, 1, len as u64); // dims
    int_field(&mut tensor, 2, 2); // data_type: UINT8
    bytes_field(&mut tensor, 8, b"w");
    for (key, value) in [
        ("location", location.to_owned()),
        ("offset", "0".to_owned()),
        ("length", len.to_string()),
    ] {
        let mut entry = Vec::new();
        bytes_field(&mut entry, 1, key.as_bytes());
        bytes_field(&mut entry, 2, value.as_bytes());
        bytes_field(&mut tensor, 13, &entry); // external_data
    }
    int_field(&mut tensor, 14, 1); // data_location: EXTERNAL
    let mut node = Vec::new();
    bytes_field(&mut node, 1, b"w");
    bytes_field(&mut node, 2, b"y");
    bytes_field(&mut node, 4, b"Identity");
    let mut graph = Vec::new();
    bytes_field(&mut graph, 1, &node);
    bytes_field(&mut graph, 2, b"external");
    bytes_field(&mut graph, 5, &tensor);
    bytes_field(&mut graph, 12, &value_info("y", 2, &[Some(len as i64)]));
    model_proto(&graph)
}

/// `ConstantOfShape(x) -> y`: an INT64 `[1]` input names the size of a FLOAT output, so
/// 95 bytes of model can ask for gigabytes.
pub fn constant_of_shape_model() -> Vec<u8> {
    let mut node = Vec::new();
    bytes_field(&mut node, 1, b"x");
    bytes_field(&mut node, 2, b"y");
    bytes_field(&mut node, 4, b"ConstantOfShape");
    let mut graph = Vec::new();
    bytes_field(&mut graph, 1, &node);
    bytes_field(&mut graph, 2, b"amplifier");
    bytes_field(&mut graph, 11, &value_info("x", 7, &[Some(1)]));
    bytes_field(&mut graph, 12, &value_info("y", 1, &[None]));
    model_proto(&graph)
}

/// A scalar initializer: `data_type` and its little-endian bytes.
fn scalar(name: &str, data_type: u64, raw: &[u8]) -> Vec<u8> {
    let mut tensor = Vec::new();
    int_field(&mut tensor, 2, data_type);
    bytes_field(&mut tensor, 8, name.as_bytes());
    bytes_field(&mut tensor, 9, raw);
    tensor
}

fn node(inputs: &[&str], outputs: &[&str], op: &str, attributes: &[Vec<u8>]) -> Vec<u8> {
    let mut node = Vec::new();
    for input in inputs {
        bytes_field(&mut node, 1, input.as_bytes());
    }
    for output in outputs {
        bytes_field(&mut node, 2, output.as_bytes());
    }
    bytes_field(&mut node, 4, op.as_bytes());
    for attribute in attributes {
        bytes_field(&mut node, 5, attribute);
    }
    node
}

/// `y = Loop(2^40 times) { v + v }` over a FLOAT `[1]` input `v`: an inference that
/// runs for hours unless it is stopped.
pub fn endless_loop_model() -> Vec<u8> {
    let mut body = Vec::new();
    bytes_field(
        &mut body,
        1,
        &node(&["cond_in"], &["cond_out"], "Identity", &[]),
    );
    bytes_field(
        &mut body,
        1,
        &node(&["v_in", "v_in"], &["v_out"], "Add", &[]),
    );
    bytes_field(&mut body, 2, b"body");
    bytes_field(&mut body, 11, &value_info("i", 7, &[]));
    bytes_field(&mut body, 11, &value_info("cond_in", 9, &[]));
    bytes_field(&mut body, 11, &value_info("v_in", 1, &[Some(1)]));
    bytes_field(&mut body, 12, &value_info("cond_out", 9, &[]));
    bytes_field(&mut body, 12, &value_info("v_out", 1, &[Some(1)]));
    let mut attribute = Vec::new();
    bytes_field(&mut attribute, 1, b"body");
    bytes_field(&mut attribute, 6, &body); // g
    int_field(&mut attribute, 20, 5); // type: GRAPH
    let mut graph = Vec::new();
    bytes_field(
        &mut graph,
        1,
        &node(&["M", "cond", "v"], &["y"], "Loop", &[attribute]),
    );
    bytes_field(&mut graph, 2, b"endless");
    bytes_field(&mut graph, 5, &scalar("M", 7, &(1_u64 << 40).to_le_bytes()));
    bytes_field(&mut graph, 5, &scalar("cond", 9, &[1]));
    bytes_field(&mut graph, 11, &value_info("v", 1, &[Some(1)]));
    bytes_field(&mut graph, 12, &value_info("y", 1, &[Some(1)]));
    model_proto(&graph)
}

/// `y = ReduceSum(Concat(c, c))` with `c` doubled `levels` times from a FLOAT `[N]` input
/// `x`: every operator is bounded by its inputs, the graph is not (2^levels × N floats).
pub fn doubling_model(levels: usize) -> Vec<u8> {
    let axis = int_attribute("axis", 0);
    let mut graph = Vec::new();
    let mut previous = "x".to_owned();
    for level in 0..levels {
        let next = format!("c{level}");
        bytes_field(
            &mut graph,
            1,
            &node(
                &[&previous, &previous],
                &[&next],
                "Concat",
                std::slice::from_ref(&axis),
            ),
        );
        previous = next;
    }
    let keepdims = int_attribute("keepdims", 0);
    bytes_field(
        &mut graph,
        1,
        &node(&[&previous], &["y"], "ReduceSum", &[keepdims]),
    );
    bytes_field(&mut graph, 2, b"doubling");
    bytes_field(&mut graph, 11, &value_info("x", 1, &[None]));
    bytes_field(&mut graph, 12, &value_info("y", 1, &[]));
    model_proto(&graph)
}
