//! The `lepton` binary.

use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    #[expect(unsafe_code, reason = "pin_candle_threads sets the environment")]
    // SAFETY: first thing in `main`, while this is the only thread.
    unsafe {
        lepton_host::train::pin_candle_threads();
    }
    let filter = EnvFilter::try_from_env("LEPTON_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,wasmtime=warn,cranelift_codegen=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match lepton_host::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
