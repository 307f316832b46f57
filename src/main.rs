//! The `doh-proxy` binary: parse the command line, check the configuration
//! into settings, run the server until SIGINT or SIGTERM.

use std::process::ExitCode;

use doh_proxy::config::{CommandLine, LogFormat, Settings};

fn main() -> ExitCode {
    let cli = CommandLine::parse();
    let loaded = cli.load().and_then(|cfg| cfg.settings());
    let (settings, warnings) = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("doh-proxy: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&settings);
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
    match rt.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("doh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let running = doh_proxy::server::start(settings).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    running.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    if let Ok(mut term) = signal(SignalKind::terminate()) {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(s: &Settings) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = if s.verbose > 1 { "debug" } else { "info" };
    let filter =
        EnvFilter::try_from_env("DOH_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match s.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
