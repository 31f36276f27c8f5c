//! ragd: retrieval-augmented question answering over your documents.
//!
//! The request flow, one module per stage:
//!
//! * [`api`] — HTTP routes; parse, call the engine, map errors ([`error`]).
//! * [`engine`] — ingest: validate → chunk → embed → store → index;
//!   ask: embed the question → search → [`prompt`] → generate → [`citations`].
//!   Documents live in the `ragd-store` crate (SQLite); the index is rebuilt from it.
//! * [`workers`] — the embedder and generator threads the engine talks to.
//! * [`config`] — defaults, config file and flags.
//!
//! [`start`] binds the listener at once, so `/health` answers and `/ready` says 503
//! while the models load on their own threads; the engine is installed when they
//! have loaded and the stored documents are back in the index.

pub mod api;
pub mod auth;
pub mod citations;
pub mod config;
pub mod content;
pub mod engine;
pub mod error;
pub mod extract;
pub mod language;
pub mod metrics;
pub mod openai;
pub mod prompt;
pub mod remote;
pub mod retrieval;
pub mod workers;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use api::{app, AppState};
pub use config::Config;
pub use engine::Engine;

use workers::{EmbedWorker, GenWorker};

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Shared state (the engine appears once loaded).
    pub state: AppState,
    loaded: Option<oneshot::Receiver<Result<(), String>>>,
    shutdown: Option<oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Waits until the models are loaded and documents replayed, or for the error
    /// that prevented it.
    pub async fn wait_ready(&mut self) -> Result<(), String> {
        match self.loaded.take() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err("the loader stopped".into())),
            None => Ok(()),
        }
    }

    /// Stops accepting connections, waits for open requests to finish and writes
    /// the index dump.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = self.serving.await.map_err(std::io::Error::other)?;
        if let Some(engine) = self.state.engine.get().cloned() {
            match tokio::task::spawn_blocking(move || engine.save_index()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the index dump"),
                Err(e) => tracing::warn!(error = %e, "cannot write the index dump"),
            }
        }
        served
    }

    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        signal.await;
        self.shutdown().await
    }
}

/// Binds `config.server.host:port`, starts serving and starts loading the models.
pub async fn start(config: Config) -> std::io::Result<Server> {
    let listener = TcpListener::bind((config.server.host.as_str(), config.server.port)).await?;
    let addr = listener.local_addr()?;
    let config = Arc::new(config);
    let state = AppState {
        engine: Arc::new(OnceLock::new()),
        body_limit: config.server.body_limit_bytes,
        keys: Arc::new(auth::Keys::new(&config.auth)),
        cors_origins: config.server.cors_origins.clone(),
        request_timeout: std::time::Duration::from_secs_f64(config.server.request_timeout_s),
    };
    let router = app(state.clone());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = shutdown_rx.await;
            })
            .await
    });

    let (loaded_tx, loaded_rx) = oneshot::channel();
    let slot = Arc::clone(&state.engine);
    tokio::spawn(async move {
        let result = load(config, slot).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "start-up failed");
        }
        let _ = loaded_tx.send(result);
    });
    Ok(Server {
        addr,
        state,
        loaded: Some(loaded_rx),
        shutdown: Some(shutdown_tx),
        serving,
    })
}

/// Opens the data directory with the embedder only, for ingesting without a
/// server (`ragd ingest`). Do not run it on a data directory a server is using:
/// the server would not see the new documents until it restarts.
pub async fn open_for_ingest(config: Config) -> Result<Arc<Engine>, String> {
    let config = Arc::new(config);
    let embedder = EmbedWorker::spawn(config.models.embedder.clone(), config.embedder.clone())
        .await
        .map_err(|_| "the embedder thread died while loading".to_string())??;
    let engine = tokio::task::spawn_blocking(move || Engine::open(config, embedder, None))
        .await
        .map_err(|e| e.to_string())??;
    Ok(Arc::new(engine))
}

async fn load(config: Arc<Config>, slot: Arc<OnceLock<Arc<Engine>>>) -> Result<(), String> {
    let embedder = EmbedWorker::spawn(config.models.embedder.clone(), config.embedder.clone());
    let generator = if config.generation.backend == "openai" {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(GenWorker::remote(
            config.remote.clone(),
            config.generation.queue_size,
            config.generation.slots,
        ));
        rx
    } else {
        GenWorker::spawn(
            config.models.generator.clone(),
            config.generation.queue_size,
            config.generation.requantize,
            config.generation.slots,
        )
    };
    let embedder = embedder
        .await
        .map_err(|_| "the embedder thread died while loading".to_string())??;
    let generator = generator
        .await
        .map_err(|_| "the generator thread died while loading".to_string())??;
    let engine =
        tokio::task::spawn_blocking(move || Engine::open(config, embedder, Some(generator)))
            .await
            .map_err(|e| e.to_string())??;
    slot.set(Arc::new(engine))
        .map_err(|_| "engine installed twice".to_string())?;
    tracing::info!("ready");
    Ok(())
}
