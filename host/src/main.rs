//! The `lepton` binary.

use std::io::Write as _;

use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    #[expect(unsafe_code, reason = "pin_candle_threads sets the environment")]
    // SAFETY: first thing in `main`, while this is the only thread.
    unsafe {
        lepton_host::train::pin_candle_threads();
    }
    let filter = EnvFilter::try_from_env("LEPTON_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,wasmtime=warn,cranelift_codegen=warn"));
    match lepton_host::cli::main(filter) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Not `eprintln!`: with stderr a broken pipe it would panic.
            let _ = writeln!(std::io::stderr(), "error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
