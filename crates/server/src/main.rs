//! The `ragd` command: `ragd serve`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ragd_server::Config;

#[derive(Parser)]
#[command(name = "ragd", version, about = "Retrieval-augmented question answering over your documents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        /// Config file (TOML), merged over the built-in defaults.
        /// Default: config/ragd.toml when it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen port (overrides server.port).
        #[arg(long)]
        port: Option<u16>,
        /// Listen address (overrides server.host).
        #[arg(long)]
        host: Option<String>,
        /// Data directory (overrides server.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// GGUF chat model (overrides models.generator).
        #[arg(long)]
        generator: Option<PathBuf>,
    },
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAGD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, port, host, data_dir, generator } => {
            let default_file = PathBuf::from("config/ragd.toml");
            let mut cfg = match config {
                Some(path) => Config::from_file(&path)?,
                None if default_file.exists() => Config::from_file(&default_file)?,
                None => Config::defaults(),
            };
            if let Some(p) = port {
                cfg.server.port = p;
            }
            if let Some(h) = host {
                cfg.server.host = h;
            }
            if let Some(d) = data_dir {
                cfg.server.data_dir = d;
            }
            if let Some(g) = generator {
                cfg.models.generator = g;
            }
            for (what, path) in [("embedder", &cfg.models.embedder), ("generator", &cfg.models.generator)] {
                if !path.exists() {
                    anyhow::bail!(
                        "the {what} model {} does not exist: run scripts/fetch-models from the repository root, or set models.{what}",
                        path.display()
                    );
                }
            }
            tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "effective configuration");
            let mut server = ragd_server::start(cfg).await.context("cannot listen")?;
            tracing::info!(addr = %server.addr, "listening");
            tokio::select! {
                r = server.wait_ready() => r.map_err(anyhow::Error::msg).context("cannot start")?,
                _ = shutdown_signal() => return Ok(()),
            }
            server.run_until(shutdown_signal()).await.context("server failed")?;
        }
    }
    Ok(())
}
