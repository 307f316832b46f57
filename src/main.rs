//! The `doh-proxy` binary: parse the command line, check the configuration
//! into settings, run the server; SIGHUP reloads, SIGINT and SIGTERM stop.

use std::process::ExitCode;

use doh_proxy::app::{LogFormat, Settings};
use doh_proxy::config::CommandLine;
use doh_proxy::server::systemd::{self, Inherited, State};

/// jemalloc gives memory back once a crowd of connections has closed
/// (its settings: `.cargo/config.toml`); glibc's malloc would keep it.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Before any thread: socket activation reads and clears variables.
    let inherited = Inherited::from_env();
    // One crypto provider for every TLS client and server in the process
    // (the Redis client's among them).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = CommandLine::parse();
    let passed = !inherited.is_empty();
    let loaded = cli.load().and_then(|cfg| cfg.settings_for(passed));
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
    match rt.block_on(run(&cli, settings, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("doh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &CommandLine, settings: Settings, inherited: Inherited) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let passed = !inherited.is_empty();
    let running = doh_proxy::app::start_with(settings, inherited).await?;
    systemd::notify(State::Ready);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                systemd::notify(State::Reloading);
                // The file again, with the flags typed at start still on top.
                match cli.load().and_then(|c| c.settings_for(passed)) {
                    Ok((settings, warnings)) => {
                        for w in warnings {
                            tracing::warn!("{w}");
                        }
                        let _ = running.reload(settings);
                    }
                    Err(e) => {
                        running.app.metrics.ops.reload(false);
                        tracing::error!("reload refused, the running configuration stays: {e}");
                    }
                }
                systemd::notify(State::Ready);
            }
        }
    }
    systemd::notify(State::Stopping);
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    running.stop().await;
    Ok(())
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
