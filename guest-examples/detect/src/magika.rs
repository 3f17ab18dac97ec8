//! Magika's (v3 model) preprocessing and decision rules, ported from the `magika`
//! 1.0.3 Python package (`magika/magika.py`). Pure logic, no I/O: the caller reads
//! the config, runs the model and looks up which labels are text.
//!
//! The steps, as Magika does them for one file:
//! 1. An empty file is `empty`.
//! 2. A file shorter than `min_file_size_for_dl` is `txt` if it is valid UTF-8,
//!    else `unknown` (no model).
//! 3. Otherwise read at most `block_size` bytes from each end; strip ASCII
//!    whitespace from the start of the first block and the end of the last one;
//!    the first `beg_size` bytes (padded at the end with `padding_token`) and the
//!    last `end_size` bytes (padded at the start) are the model's input.
//! 4. If fewer than `min_file_size_for_dl` bytes are left at the start, step 2's
//!    rule is applied to the first block instead (no model).
//! 5. The model's most probable label (the first one on a tie) is `dl_label`;
//!    `overwrite_map` may rename it; in high-confidence mode a score below the
//!    label's threshold (`thresholds`, else `medium_confidence_threshold`) gives
//!    `txt` or `unknown` instead, depending on whether the label is text.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `config.min.json`, the fields this port reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub beg_size: usize,
    pub mid_size: usize,
    pub end_size: usize,
    pub use_inputs_at_offsets: bool,
    pub medium_confidence_threshold: f64,
    pub min_file_size_for_dl: usize,
    pub padding_token: i32,
    pub block_size: usize,
    pub target_labels_space: Vec<String>,
    pub thresholds: HashMap<String, f64>,
    pub overwrite_map: HashMap<String, String>,
}

impl Config {
    /// Parses `config.min.json` and checks it is one this port handles (the same
    /// assertions as Magika's feature extraction).
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let config: Self =
            serde_json::from_slice(json).map_err(|e| format!("bad magika config: {e}"))?;
        let supported = config.mid_size == 0
            && !config.use_inputs_at_offsets
            && config.beg_size < config.block_size
            && config.end_size < config.block_size
            && (1..=config.beg_size).contains(&config.min_file_size_for_dl)
            && !config.target_labels_space.is_empty();
        if !supported {
            return Err(format!(
                "unsupported magika config: beg_size {}, mid_size {}, end_size {}, block_size {}, \
                 min_file_size_for_dl {}, use_inputs_at_offsets {}, {} labels",
                config.beg_size,
                config.mid_size,
                config.end_size,
                config.block_size,
                config.min_file_size_for_dl,
                config.use_inputs_at_offsets,
                config.target_labels_space.len()
            ));
        }
        Ok(config)
    }

    /// How many `i32`s [`prepare`] puts in the model's input.
    pub fn input_len(&self) -> usize {
        self.beg_size + self.end_size
    }
}

/// How sure the caller wants the answer to be (Magika's `PredictionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The model's label whatever its score.
    BestGuess,
    /// The model's label when its score reaches `medium_confidence_threshold`.
    MediumConfidence,
    /// The model's label when its score reaches the label's own threshold.
    #[default]
    HighConfidence,
}

impl Mode {
    /// Parses Magika's names for the modes (`high-confidence`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "best-guess" => Some(Self::BestGuess),
            "medium-confidence" => Some(Self::MediumConfidence),
            "high-confidence" => Some(Self::HighConfidence),
            _ => None,
        }
    }
}

/// The answer for one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The final label.
    pub label: String,
    /// The model's most probable label, or `undefined` when the model did not run.
    pub dl_label: String,
    /// The model's probability for `dl_label`, or 1 when the model did not run.
    pub score: f32,
}

impl Verdict {
    fn without_model(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            dl_label: "undefined".to_owned(),
            score: 1.0,
        }
    }
}

/// What to do with a file: answered already, or run the model on this input.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Answered without the model.
    Done(Verdict),
    /// The model's `bytes` input: `beg_size + end_size` values in `0..=255` or
    /// `padding_token`, to be shaped `[1, beg_size + end_size]`.
    Infer(Vec<i32>),
}

/// Python's `bytes.strip()` whitespace: space, `\t`, `\n`, `\v`, `\f`, `\r`.
/// (`u8::is_ascii_whitespace` leaves out `\v`.)
fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Steps 1 to 4: answers `content` or builds the model's input for it.
pub fn prepare(content: &[u8], config: &Config) -> Step {
    if content.is_empty() {
        return Step::Done(Verdict::without_model("empty"));
    }
    if content.len() < config.min_file_size_for_dl {
        return Step::Done(few_bytes(content));
    }
    let block = config.block_size.min(content.len());
    let pad = config.padding_token;

    let first = &content[..block];
    let beg = match first.iter().position(|&b| !is_space(b)) {
        Some(start) => &first[start..],
        None => &[],
    };
    let beg = &beg[..beg.len().min(config.beg_size)];

    let last = &content[content.len() - block..];
    let end = match last.iter().rposition(|&b| !is_space(b)) {
        Some(stop) => &last[..=stop],
        None => &[],
    };
    let end = &end[end.len() - end.len().min(config.end_size)..];

    // Not enough bytes left after stripping for a meaningful prediction.
    if beg.len() < config.min_file_size_for_dl {
        return Step::Done(few_bytes(first));
    }

    let mut input = Vec::with_capacity(config.input_len());
    input.extend(beg.iter().map(|&b| i32::from(b)));
    input.resize(config.beg_size, pad);
    input.resize(config.beg_size + config.end_size - end.len(), pad);
    input.extend(end.iter().map(|&b| i32::from(b)));
    Step::Infer(input)
}

/// A few bytes are `txt` when they are valid UTF-8, else `unknown`.
fn few_bytes(content: &[u8]) -> Verdict {
    Verdict::without_model(if std::str::from_utf8(content).is_ok() {
        "txt"
    } else {
        "unknown"
    })
}

/// Step 5: the verdict from the model's probabilities, one per label.
/// `is_text(label)` says whether a label is text (Magika's content-type table); it
/// is asked only when the score is too low.
pub fn decide(
    config: &Config,
    mode: Mode,
    probabilities: &[f32],
    is_text: impl FnOnce(&str) -> Result<bool, String>,
) -> Result<Verdict, String> {
    if probabilities.len() != config.target_labels_space.len() {
        return Err(format!(
            "the model gave {} probabilities for {} labels",
            probabilities.len(),
            config.target_labels_space.len()
        ));
    }
    // The first maximum, as Python's `max(range(n), key=...)` picks.
    let mut best = 0;
    for (i, &p) in probabilities.iter().enumerate() {
        if p > probabilities[best] {
            best = i;
        }
    }
    let score = probabilities[best];
    let dl_label = &config.target_labels_space[best];
    let mut label = config
        .overwrite_map
        .get(dl_label)
        .unwrap_or(dl_label)
        .clone();

    let threshold = match mode {
        Mode::BestGuess => f64::NEG_INFINITY,
        Mode::MediumConfidence => config.medium_confidence_threshold,
        Mode::HighConfidence => config
            .thresholds
            .get(dl_label)
            .copied()
            .unwrap_or(config.medium_confidence_threshold),
    };
    if mode != Mode::BestGuess && f64::from(score) < threshold {
        label = if is_text(&label)? { "txt" } else { "unknown" }.to_owned();
    }
    Ok(Verdict {
        label,
        dl_label: dl_label.clone(),
        score,
    })
}

/// Which labels are text, from Magika's `content_types_kb.min.json`.
pub fn text_labels(json: &[u8]) -> Result<HashMap<String, bool>, String> {
    #[derive(Deserialize)]
    struct ContentType {
        is_text: bool,
    }
    let table: HashMap<String, ContentType> =
        serde_json::from_slice(json).map_err(|e| format!("bad magika content-type table: {e}"))?;
    Ok(table
        .into_iter()
        .map(|(label, ct)| (label, ct.is_text))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &[u8] = br#"{"beg_size":1024,"mid_size":0,"end_size":1024,"use_inputs_at_offsets":false,
        "medium_confidence_threshold":0.5,"min_file_size_for_dl":8,"padding_token":256,"block_size":4096,
        "target_labels_space":["ignorefile","python","randombytes","zip"],
        "thresholds":{"ignorefile":0.95},"overwrite_map":{"randombytes":"unknown"},"protection":"none"}"#;

    fn config() -> Config {
        Config::parse(CONFIG).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Input of the model, or the label when there is none.
    fn run(content: &[u8]) -> Result<Vec<i32>, String> {
        match prepare(content, &config()) {
            Step::Infer(input) => Ok(input),
            Step::Done(verdict) => Err(verdict.label),
        }
    }

    /// The checksum `ref.py` printed for Magika's own features: Σ (i + 1) · v.
    fn checksum(input: &[i32]) -> u64 {
        input
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u64 + 1) * v as u64)
            .sum()
    }

    fn pattern(len: usize, mul: usize, add: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * mul + add) % 256) as u8).collect()
    }

    #[test]
    fn answers_without_the_model_like_magika() {
        assert_eq!(run(b""), Err("empty".into()));
        assert_eq!(run(b"hi\n"), Err("txt".into()));
        assert_eq!(run(b"\xff\xfe\x00"), Err("unknown".into()));
        assert_eq!(run(b"caf\xc3\xa9"), Err("txt".into()));
        assert_eq!(run(b"caf\xc3"), Err("unknown".into()));
        // 14 bytes, but only 6 left after stripping.
        assert_eq!(run(b"        ab\n\n\n\n"), Err("txt".into()));
        assert_eq!(
            prepare(b"", &config()),
            Step::Done(Verdict::without_model("empty"))
        );
    }

    /// Checksums printed by Magika 1.0.3's `_extract_features_from_seekable`.
    #[test]
    fn features_match_magika() -> Result<(), String> {
        let cases: [(&str, Vec<u8>, u64); 7] = [
            ("ws_padded", b" \t\n\x0b\x0c\rabcdefg\r\n \x0b".to_vec(), 531932682),
            ("ws_too_few", b"      \n\n\n  abc   \n\n\n\n".to_vec(), 530988778),
            ("json", br#"{"a": [1, 2, 3], "b": {"c": "d"}}"#.iter().chain(b"\n").copied().collect(), 523903456),
            ("pattern_3000", pattern(3000, 7, 3), 268932096),
            ("pattern_5000", pattern(5000, 13, 1), 268209152),
            (
                "pattern_4096_ws",
                b"\n".repeat(100).into_iter().chain(pattern(3896, 5, 0)).collect(),
                269174784,
            ),
            (
                "python",
                b"import os\n\ndef main():\n    print(os.getcwd())\n\nif __name__ == '__main__':\n    main()\n".to_vec(),
                506197184,
            ),
        ];
        for (name, content, expected) in cases {
            let input = run(&content)?;
            assert_eq!(input.len(), 2048, "{name}");
            assert_eq!(checksum(&input), expected, "{name}");
        }
        Ok(())
    }

    #[test]
    fn beg_is_padded_at_the_end_and_end_at_the_start() -> Result<(), String> {
        let input = run(b" \t\n\x0b\x0c\rabcdefg\r\n \x0b")?;
        // Only the start of `beg` and the end of `end` are stripped.
        assert_eq!(
            input[..11],
            [97, 98, 99, 100, 101, 102, 103, 13, 10, 32, 11]
        );
        assert!(input[11..2035].iter().all(|&v| v == 256));
        assert_eq!(
            input[2035..],
            [32, 9, 10, 11, 12, 13, 97, 98, 99, 100, 101, 102, 103]
        );
        Ok(())
    }

    fn decide_with(mode: Mode, probabilities: &[f32]) -> Result<Verdict, String> {
        decide(&config(), mode, probabilities, |label| {
            Ok(label == "ignorefile" || label == "python")
        })
    }

    #[test]
    fn confident_labels_are_kept_and_overwritten() -> Result<(), String> {
        let verdict = decide_with(Mode::HighConfidence, &[0.0, 0.9, 0.1, 0.0])?;
        assert_eq!(
            (
                verdict.label.as_str(),
                verdict.dl_label.as_str(),
                verdict.score
            ),
            ("python", "python", 0.9)
        );
        let verdict = decide_with(Mode::HighConfidence, &[0.0, 0.0, 0.97, 0.03])?;
        assert_eq!(
            (verdict.label.as_str(), verdict.dl_label.as_str()),
            ("unknown", "randombytes")
        );
        Ok(())
    }

    #[test]
    fn low_scores_fall_back_to_txt_or_unknown() -> Result<(), String> {
        // Below ignorefile's own threshold of 0.95 (as Magika answers for `ws_padded`).
        let verdict = decide_with(Mode::HighConfidence, &[0.49, 0.2, 0.2, 0.11])?;
        assert_eq!(
            (verdict.label.as_str(), verdict.dl_label.as_str()),
            ("txt", "ignorefile")
        );
        assert_eq!(
            decide_with(Mode::MediumConfidence, &[0.6, 0.2, 0.2, 0.0])?.label,
            "ignorefile"
        );
        assert_eq!(
            decide_with(Mode::HighConfidence, &[0.1, 0.2, 0.3, 0.4])?.label,
            "unknown"
        );
        assert_eq!(
            decide_with(Mode::BestGuess, &[0.1, 0.2, 0.3, 0.4])?.label,
            "zip"
        );
        Ok(())
    }

    #[test]
    fn ties_pick_the_first_label() -> Result<(), String> {
        assert_eq!(
            decide_with(Mode::BestGuess, &[0.25; 4])?.dl_label,
            "ignorefile"
        );
        Ok(())
    }

    #[test]
    fn rejects_what_it_cannot_handle() {
        assert!(decide_with(Mode::BestGuess, &[1.0]).is_err());
        let mid = String::from_utf8_lossy(CONFIG).replace(r#""mid_size":0"#, r#""mid_size":8"#);
        assert!(
            Config::parse(mid.as_bytes())
                .is_err_and(|e| e.starts_with("unsupported magika config"))
        );
        assert!(Config::parse(b"{}").is_err_and(|e| e.starts_with("bad magika config")));
    }

    #[test]
    fn reads_the_content_type_table() -> Result<(), String> {
        let table =
            text_labels(br#"{"txt":{"is_text":true,"group":"text"},"zip":{"is_text":false}}"#)?;
        assert_eq!(
            (table.get("txt"), table.get("zip")),
            (Some(&true), Some(&false))
        );
        Ok(())
    }
}
