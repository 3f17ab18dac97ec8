//! The digits batch format and the arithmetic the guest does itself: reading a batch
//! (8x8 images, pixels `0..=16`, scaled by 1/16 for the model), the argmax of each
//! row of logits and their mean softmax cross-entropy.

use std::fmt;

use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// Numbers per image (8x8 pixels).
pub const PIXELS: usize = 64;
/// The largest pixel value; the model sees pixels divided by it.
pub const MAX_PIXEL: f64 = 16.0;

/// A batch as the client sends it:
/// `{"images": [[64 numbers 0..=16], ...], "labels": [0..=9, ...]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// How many images.
    pub rows: u32,
    /// The images' pixels divided by [`MAX_PIXEL`], row-major `[rows, PIXELS]`.
    pub scaled: Vec<f32>,
    /// One class index per image, when the client sent them. Not range-checked here:
    /// the trainer (or [`cross_entropy`]) knows how many classes there are.
    pub labels: Option<Vec<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    images: Images,
    labels: Option<Vec<i64>>,
}

impl Batch {
    /// Reads a batch from a JSON body; the message says what is wrong with it.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let raw: RawBatch =
            serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))?;
        let rows = raw.images.0.len() / PIXELS;
        if rows == 0 {
            return Err("`images` is empty".to_owned());
        }
        let rows = u32::try_from(rows).map_err(|_| format!("{rows} images are too many"))?;
        if let Some(labels) = &raw.labels
            && labels.len() != rows as usize
        {
            return Err(format!("{rows} images but {} labels", labels.len()));
        }
        Ok(Self {
            rows,
            scaled: raw.images.0,
            labels: raw.labels,
        })
    }
}

/// The images of a batch, scaled and flattened while they are read, so a request
/// costs 4 bytes per pixel and every row is checked as it arrives.
struct Images(Vec<f32>);

impl<'de> Deserialize<'de> for Images {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(ImagesVisitor)
    }
}

struct ImagesVisitor;

impl<'de> Visitor<'de> for ImagesVisitor {
    type Value = Images;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a list of images, each a list of {PIXELS} numbers 0..=16"
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Images, A::Error> {
        let mut pixels = Vec::new();
        let mut index = 0;
        while seq
            .next_element_seed(Row {
                pixels: &mut pixels,
                index,
            })?
            .is_some()
        {
            index += 1;
        }
        Ok(Images(pixels))
    }
}

/// One image, appended to the batch's pixels.
struct Row<'a> {
    pixels: &'a mut Vec<f32>,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for Row<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Row<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "image {} as a list of {PIXELS} numbers 0..=16",
            self.index
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut len = 0;
        while let Some(pixel) = seq.next_element::<f64>()? {
            if len == PIXELS {
                return Err(de::Error::custom(format!(
                    "image {} has more than {PIXELS} numbers",
                    self.index
                )));
            }
            if !(0.0..=MAX_PIXEL).contains(&pixel) {
                return Err(de::Error::custom(format!(
                    "image {}: pixel {len} is {pixel}, not in 0..=16",
                    self.index
                )));
            }
            self.pixels.push((pixel / MAX_PIXEL) as f32);
            len += 1;
        }
        if len != PIXELS {
            return Err(de::Error::custom(format!(
                "image {} has {len} numbers, not {PIXELS}",
                self.index
            )));
        }
        Ok(())
    }
}

/// Checks that `logits` is `rows` rows of `classes` values.
fn check_shape(logits: &[f32], classes: usize) -> Result<usize, String> {
    if classes == 0 || !logits.len().is_multiple_of(classes) {
        return Err(format!(
            "{} logits do not make rows of {classes} classes",
            logits.len()
        ));
    }
    Ok(logits.len() / classes)
}

/// The most probable class of each row of `logits` (`classes` values a row); the
/// first one on ties, as numpy's `argmax` picks.
pub fn argmax(logits: &[f32], classes: usize) -> Result<Vec<usize>, String> {
    check_shape(logits, classes)?;
    Ok(logits
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0;
            for (i, &logit) in row.iter().enumerate() {
                if logit > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect())
}

/// The mean over rows of the softmax cross-entropy `logsumexp(row) - row[label]`,
/// as the trainer's `cross-entropy` loss computes it. The log-sum-exp subtracts the
/// row's maximum first, so large logits do not overflow; sums are taken in `f64`.
pub fn cross_entropy(logits: &[f32], classes: usize, labels: &[i64]) -> Result<f32, String> {
    let rows = check_shape(logits, classes)?;
    if rows != labels.len() || rows == 0 {
        return Err(format!("{rows} rows of logits but {} labels", labels.len()));
    }
    let mut total = 0.0_f64;
    for (index, (row, &label)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        let target = usize::try_from(label)
            .ok()
            .filter(|&label| label < classes)
            .ok_or_else(|| {
                format!("label {label} of image {index} is not a class in 0..{classes}")
            })?;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let max = f64::from(max);
        let sum: f64 = row.iter().map(|&l| (f64::from(l) - max).exp()).sum();
        total += max + sum.ln() - f64::from(row[target]);
    }
    Ok((total / rows as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(images: &str, labels: &str) -> String {
        format!(r#"{{"images": {images}{labels}}}"#)
    }

    fn row(value: u32) -> String {
        format!("[{}]", vec![value.to_string(); PIXELS].join(","))
    }

    #[test]
    fn reads_and_scales_a_batch() -> Result<(), String> {
        let batch = Batch::parse(
            body(
                &format!("[{}, {}]", row(16), row(4)),
                r#", "labels": [3, 7]"#,
            )
            .as_bytes(),
        )?;
        assert_eq!(batch.rows, 2);
        assert_eq!(batch.scaled.len(), 2 * PIXELS);
        assert!(batch.scaled[..PIXELS].iter().all(|&p| p == 1.0));
        assert!(batch.scaled[PIXELS..].iter().all(|&p| p == 0.25));
        assert_eq!(batch.labels, Some(vec![3, 7]));
        // Labels are optional; fractional pixels are fine.
        let batch =
            Batch::parse(body(&format!("[[{}0.5]]", "0,".repeat(PIXELS - 1)), "").as_bytes())?;
        assert_eq!(
            (batch.rows, batch.scaled[PIXELS - 1], batch.labels),
            (1, 0.03125, None)
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_batches() {
        let error = |text: String| Batch::parse(text.as_bytes()).err().unwrap_or_default();
        let short = format!("[[{}]]", vec!["1"; PIXELS - 1].join(","));
        assert!(error(body(&short, "")).contains("image 0 has 63 numbers, not 64"));
        let long = format!("[{}, [{}]]", row(0), vec!["1"; PIXELS + 1].join(","));
        assert!(error(body(&long, "")).contains("image 1 has more than 64 numbers"));
        let bright = format!("[[{}17]]", "0,".repeat(PIXELS - 1));
        assert!(error(body(&bright, "")).contains("image 0: pixel 63 is 17, not in 0..=16"));
        assert!(error(body("[]", "")).contains("`images` is empty"));
        assert!(
            error(body(&format!("[{}]", row(1)), r#", "labels": [1, 2]"#))
                .contains("1 images but 2 labels")
        );
        assert!(
            error(body(&format!("[{}]", row(1)), r#", "labels": [1.5]"#))
                .starts_with("bad request body")
        );
        assert!(
            error(body(&format!("[{}]", row(1)), r#", "label": [1]"#))
                .contains("unknown field `label`")
        );
        assert!(error("[1, 2]".to_owned()).starts_with("bad request body"));
        assert!(error("{".to_owned()).starts_with("bad request body"));
    }

    #[test]
    fn argmax_picks_the_first_maximum() -> Result<(), String> {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 5.0, -1.0, 4.0], 3)?, [1, 0]);
        assert!(argmax(&[0.0; 5], 3).is_err());
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_numpy() -> Result<(), String> {
        // Uniform logits: ln(classes) whatever the label.
        let uniform = cross_entropy(&[0.5; 20], 10, &[0, 9])?;
        assert!((uniform - 10f32.ln()).abs() < 1e-6, "{uniform}");
        // Logits [[1, 2, 3], [1000, 0, -1000]], labels [2, 1]: (0.4076 + 1000) / 2.
        let loss = cross_entropy(&[1.0, 2.0, 3.0, 1000.0, 0.0, -1000.0], 3, &[2, 1])?;
        let expected = ((3f64.exp() + 2f64.exp() + 1f64.exp()).ln() - 3.0 + 1000.0) / 2.0;
        assert!(
            (f64::from(loss) - expected).abs() < 1e-4,
            "{loss} vs {expected}"
        );
        assert!(loss.is_finite());
        Ok(())
    }

    #[test]
    fn cross_entropy_rejects_unknown_classes() {
        assert_eq!(
            cross_entropy(&[0.0; 6], 3, &[0, 3]).err(),
            Some("label 3 of image 1 is not a class in 0..3".to_owned())
        );
        assert!(cross_entropy(&[0.0; 6], 3, &[-1, 0]).is_err());
        assert!(cross_entropy(&[0.0; 6], 3, &[0]).is_err());
    }
}
