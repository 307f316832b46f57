//! The `doh-proxy` binary: parse the command line, check the configuration,
//! run the server until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use doh_proxy::config::{Cli, Command, Config, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("doh-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let warnings = match cfg.validate() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("doh-proxy: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Check) = cli.command {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&cfg);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("doh-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("doh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let running = doh_proxy::server::start(cfg).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    running.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let default = if cfg.verbose > 1 { "debug" } else { "info" };
    let filter =
        EnvFilter::try_from_env("DOH_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
