//! Paths of the guest examples, compiled to components by this crate's build script.
//!
//! ```
//! assert!(std::path::Path::new(lepton_test_artifacts::HELLO).exists());
//! ```
#![deny(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));
