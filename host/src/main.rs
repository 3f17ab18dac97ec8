//! The `lepton` binary.

use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    pin_candle_threads();
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

/// candle (the training backend) asks how many threads to use on every matrix
/// product, and unless `RAYON_NUM_THREADS` is set it works that out by reading
/// `/proc/cpuinfo`: that made a small training step 3.6x slower (260 against 72 us,
/// `cargo bench --bench train`). Answer it once, before any thread starts.
fn pin_candle_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        #[expect(unsafe_code, reason = "setting the environment is unsafe once other threads run")]
        // SAFETY: called first thing in `main`, while this is the only thread.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
        }
    }
}
