//! The `detect` example: Magika over wasi:nn answers as native ONNX Runtime does.

use std::path::PathBuf;

use crate::util::{Lepton, Project, ort_library, root};

fn magika_dir() -> PathBuf {
    root().join(".cache/models/magika")
}

fn start(batch: &str) -> (Project, Lepton) {
    let magika = magika_dir();
    let project = Project::new(&crate::util::manifest(&format!(
        "[model.magika]\npath = {:?}\n{batch}\n\
         [function.detect]\ncomponent = \"{{DETECT}}\"\nroute = \"/detect\"\nmodels = [\"magika\"]\n\
         files = [{{ source = {:?}, destination = \"/magika\" }}]\n",
        magika.join("model.onnx").display().to_string(),
        magika.display().to_string()
    )));
    let lepton = project.up_with_ort();
    (project, lepton)
}

/// Magika v3's model input, written independently of the guest: the first and last
/// 1024 bytes of the file with whitespace trimmed at the ends, padded with 256.
fn features(file: &[u8]) -> Vec<i32> {
    // Python's `bytes.strip()`: ASCII whitespace and the vertical tab.
    let space = |b: &u8| b.is_ascii_whitespace() || *b == 0x0b;
    let head = &file[..file.len().min(4096)];
    let head = &head[head.iter().position(|b| !space(b)).unwrap_or(head.len())..];
    let tail = &file[file.len().saturating_sub(4096)..];
    let tail = &tail[..tail.iter().rposition(|b| !space(b)).map_or(0, |i| i + 1)];
    let mut input = vec![256i32; 2048];
    for (slot, &byte) in input[..1024].iter_mut().zip(head.iter().take(1024)) {
        *slot = i32::from(byte);
    }
    let tail = &tail[tail.len().saturating_sub(1024)..];
    let offset = 2048 - tail.len();
    for (slot, &byte) in input[offset..].iter_mut().zip(tail) {
        *slot = i32::from(byte);
    }
    input
}

/// The model's most probable label and its score, from native ONNX Runtime.
fn native(files: &[(&str, Vec<u8>)]) -> Vec<(String, f32)> {
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(magika_dir().join("config.min.json")).expect("config"),
    )
    .expect("json");
    let labels = config["target_labels_space"].as_array().expect("labels");
    // One ONNX Runtime environment per test process, shared by the tests that need it.
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(|| {
        ort::init_from(ort_library())
            .expect("load ORT")
            .with_name("test")
            .build()
            .expect("env")
    });
    let mut session = ort::session::Session::builder(env)
        .expect("builder")
        .commit_from_file(magika_dir().join("model.onnx"))
        .expect("model");
    files
        .iter()
        .map(|(_, file)| {
            let input =
                ort::value::Tensor::from_array((vec![1i64, 2048], features(file))).expect("tensor");
            let outputs = session.run(vec![("bytes", input.into_dyn())]).expect("run");
            let (_, scores) = outputs["target_label"]
                .try_extract_tensor::<f32>()
                .expect("scores");
            let (best, score) = scores
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("non-empty");
            (labels[best].as_str().expect("label").to_owned(), *score)
        })
        .collect()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A real 32x32 RGB PNG (stored, uncompressed deflate).
fn png() -> Vec<u8> {
    let (w, h) = (32u32, 32u32);
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0); // filter: none
        for x in 0..w {
            raw.extend_from_slice(&[(x * 8) as u8, (y * 8) as u8, 128]);
        }
    }
    let mut zlib = vec![0x78, 0x01, 1];
    zlib.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    zlib.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
    zlib.extend_from_slice(&raw);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    zlib.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &zlib);
    chunk(b"IEND", &[]);
    png
}

fn pdf() -> Vec<u8> {
    let mut pdf = String::from("%PDF-1.4\n%\u{e2}\u{e3}\u{cf}\u{d3}\n");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_owned(),
        "<< /Length 44 >>\nstream\nBT /F1 24 Tf 72 700 Td (Hello from Lepton) Tj ET\nendstream".to_owned(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.push_str(&format!("{} 0 obj\n{object}\nendobj\n", i + 1));
    }
    let xref = pdf.len();
    pdf.push_str(&format!(
        "xref\n0 {}\n0000000000 65535 f \n",
        objects.len() + 1
    ));
    for offset in offsets {
        pdf.push_str(&format!("{offset:010} 00000 n \n"));
    }
    pdf.push_str(&format!(
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    ));
    pdf.into_bytes()
}

fn json_document() -> Vec<u8> {
    let items: Vec<String> = (0..40)
        .map(|i| format!("    {{\"id\": {i}, \"name\": \"item-{i}\", \"tags\": [\"a\", \"b\"], \"price\": {}.5, \"active\": {}}}", i * 3, i % 2 == 0))
        .collect();
    format!(
        "{{\n  \"items\": [\n{}\n  ],\n  \"count\": 40\n}}\n",
        items.join(",\n")
    )
    .into_bytes()
}

fn test_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("png", png()),
        ("pdf", pdf()),
        (
            "rust",
            std::fs::read(root().join("host/src/manifest.rs")).expect("a Rust source"),
        ),
        ("json", json_document()),
    ]
}

fn field<'a>(body: &'a str, name: &str) -> &'a str {
    let start = body
        .find(&format!("\"{name}\":"))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        + name.len()
        + 3;
    let rest = body[start..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().trim_matches('"')
}

#[test]
fn detect_matches_native_onnx_runtime_on_real_files() {
    let files = test_files();
    let expected = native(&files);
    let (_project, lepton) = start("");
    for ((kind, file), (label, score)) in files.iter().zip(&expected) {
        let reply = lepton.post("/detect", file);
        assert_eq!(reply.status, 200, "{kind}: {reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(
            field(&reply.body, "dl_label"),
            label,
            "{kind}: {}",
            reply.body
        );
        let guest_score: f32 = field(&reply.body, "score").parse().expect("score");
        assert!(
            (guest_score - score).abs() < 1e-4,
            "{kind}: guest {guest_score}, native {score}"
        );
        assert_eq!(label, kind, "the model itself recognises the {kind} file");
        assert_eq!(field(&reply.body, "label"), *kind, "{}", reply.body);
    }
}

#[test]
fn concurrent_detect_requests_all_answer_correctly_with_batching() {
    let files = test_files();
    let expected = native(&files);
    let (_project, lepton) = start("batch = { max_size = 16, max_wait = \"5ms\" }");
    let url = lepton.url("/detect");
    let handles: Vec<_> = (0..24)
        .map(|i| {
            let (kind, file) = files[i % files.len()].clone();
            let want = expected[i % files.len()].0.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                let reply = crate::util::reply(ureq::post(&url).send_bytes(&file));
                assert_eq!(reply.status, 200, "{kind}: {reply:?}");
                assert_eq!(field(&reply.body, "dl_label"), want, "{kind}");
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("request thread");
    }
    assert_eq!(lepton.metric("lepton_model_requests_total", "magika"), 24);
}
