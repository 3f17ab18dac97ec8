//! Compiles every guest example in `guest-examples/` to a `wasm32-wasip2`
//! component and writes their paths into `$OUT_DIR/artifacts.rs`.
//!
//! The guests build in a cargo workspace of their own, into
//! `target/guests/` of the main workspace (the same place `./run.sh` puts them),
//! so a plain `cargo test` needs nothing built beforehand.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root exists");
    let guests = root.join("guest-examples");
    let target_dir = root.join("target").join("guests");
    println!(
        "cargo:rerun-if-changed={}",
        guests.join("Cargo.toml").display()
    );
    println!("cargo:rerun-if-changed={}", root.join("sdk").display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let members = guest_members(&guests);
    for member in &members {
        println!("cargo:rerun-if-changed={}", guests.join(member).display());
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Settings meant for the outer build (flags, wrappers such as clippy-driver,
    // the host target) must not leak into the guests' build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC_")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            command.env_remove(key.as_ref());
        }
    }
    let status = command
        .status()
        .expect("failed to run cargo for the guest examples");
    assert!(
        status.success(),
        "building the guest examples failed (is the target installed? `rustup target add wasm32-wasip2`)"
    );

    let mut out = String::from(
        "/// Every guest example: (crate name, path to its component).\npub const ALL: &[(&str, &str)] = &[\n",
    );
    let mut consts = String::new();
    for member in &members {
        let path = target_dir
            .join("wasm32-wasip2/release")
            .join(format!("{}.wasm", member.replace('-', "_")));
        assert!(
            path.exists(),
            "guest {member} did not produce {}",
            path.display()
        );
        out.push_str(&format!(
            "    ({member:?}, {:?}),\n",
            path.display().to_string()
        ));
        consts.push_str(&format!(
            "/// The `{member}` guest example, compiled to a component.\npub const {}: &str = {:?};\n",
            member.to_uppercase().replace('-', "_"),
            path.display().to_string()
        ));
    }
    out.push_str("];\n");
    out.push_str(&consts);
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    std::fs::write(out_dir.join("artifacts.rs"), out).expect("write artifacts.rs");
}

/// The `members = [...]` of the guest workspace (kept as simple string list).
fn guest_members(guests: &Path) -> Vec<String> {
    let manifest =
        std::fs::read_to_string(guests.join("Cargo.toml")).expect("guest-examples/Cargo.toml");
    let line = manifest
        .lines()
        .find(|line| line.trim_start().starts_with("members"))
        .expect("guest-examples/Cargo.toml has a members line");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}
