//! The cluster: `lepton control` (the control plane) and `lepton node` (the agent and
//! its gateway) joined over NATS with JetStream, which is both the bus and the store
//! (see [`bus`] for what lives where). Placement is `lepton-scheduler`'s.
//!
//! ```text
//!  lepton deploy ──▶ lepton control ──▶ JetStream: lepton_apps, lepton_blobs (objects)
//!                    (leader lease)        │  reconcile: heartbeats ─▶ Scheduler ─▶ lepton_placements
//!                                          ▼
//!  client ──▶ any node's gateway ── local replica? ── yes ─▶ Function::handle
//!                                      │ no
//!                                      └─▶ NATS request to lepton.fn.APP.FUNCTION
//!                                          (queue group of the nodes that run it)
//! ```

pub mod agent;
pub mod bus;
pub mod control;
pub mod wire;

pub use agent::{Agent, AgentConfig};
pub use control::{Control, Leadership};

/// Parses `--labels k=v,k=v`.
pub fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        let ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 63
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !ok(key) || !ok(value) {
            return Err(format!(
                "label {pair:?}: keys and values are 1 to 63 of a-z, A-Z, 0-9, '-', '_' and '.'"
            ));
        }
        if key == "tier" && value != "cloud" && value != "edge" {
            return Err(format!("label tier={value}: tier is \"cloud\" or \"edge\""));
        }
        labels.insert(key.to_owned(), value.to_owned());
    }
    Ok(labels)
}

/// Parses `--accelerator NAME:MEMORY` (memory as `80GiB`).
pub fn parse_accelerator(text: &str) -> Result<(String, u64), String> {
    let (kind, memory) = text
        .split_once(':')
        .ok_or_else(|| format!("accelerator {text:?} is not NAME:MEMORY"))?;
    if kind.is_empty() || kind.len() > 63 {
        return Err(format!(
            "accelerator {text:?}: the name is 1 to 63 characters"
        ));
    }
    let memory = crate::manifest::parse_size(memory)?;
    Ok((kind.to_owned(), memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_accelerators_parse() {
        let labels = parse_labels("tier=edge, region=eu-west,zone=a").expect("labels");
        assert_eq!(labels["tier"], "edge");
        assert_eq!(labels["zone"], "a");
        assert!(parse_labels("tier=moon").is_err());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("a b=c").is_err());
        assert_eq!(
            parse_accelerator("nvidia-h200:141GiB").expect("accelerator"),
            ("nvidia-h200".to_owned(), 141 << 30)
        );
        assert!(parse_accelerator("gpu").is_err());
        assert!(parse_accelerator("gpu:lots").is_err());
    }
}
