//! The ragd program: its configuration, and the wiring that turns a
//! configuration into a running service — the engines chosen from it
//! (`ragd-backends`), the pipeline over them (`ragd-pipeline`), and the HTTP
//! API in front (`ragd-server`). The `ragd` binary (`main.rs`) is the command
//! line over this library; the end-to-end tests start servers through it.
//!
//! [`start`] binds the listener at once, so `/health` answers and `/ready`
//! says 503 while the models load on their own threads; the pipeline is
//! installed when they have loaded and the stored documents are back.

#![deny(missing_docs)]

pub mod config;

use std::net::SocketAddr;
use std::sync::Arc;

use ragd_backends::{
    LocalEmbedder, LocalGenerator, LocalOptions, PgConfig, PgStore, RemoteGenerator, SqliteStore,
};
use ragd_core::{DocumentStore, Embed, Generate, NoRerank};
use ragd_pipeline::route::RoutedEmbedder;
use ragd_pipeline::{Engines, Pipeline};
use ragd_server::{AppState, Http, RequestLimits};
use tokio::sync::oneshot;

pub use config::{Config, ConfigError};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A model, the database or the index could not be loaded.
    #[error(transparent)]
    Load(#[from] ragd_backends::LoadError),
    /// The configuration does not fit the loaded models.
    #[error("invalid configuration: {0}")]
    Config(#[from] ragd_pipeline::ConfigError),
    /// A loader thread or task ended without a result.
    #[error("the {0} stopped while loading")]
    Stopped(&'static str),
    /// A source of `[[sources.declare]]` cannot be registered.
    #[error("sources: {0}")]
    Sources(String),
}

/// A running service.
#[derive(Debug)]
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// What the handlers share (the pipeline appears once loaded).
    pub state: AppState,
    http: Http,
    loaded: Option<oneshot::Receiver<Result<(), StartError>>>,
}

impl Server {
    /// Waits until the models are loaded and the documents are back, or for
    /// the error that prevented it.
    pub async fn wait_ready(&mut self) -> Result<(), StartError> {
        match self.loaded.take() {
            Some(rx) => rx.await.unwrap_or(Err(StartError::Stopped("loader"))),
            None => Ok(()),
        }
    }

    /// Stops accepting connections, waits for open requests to finish and
    /// writes what the store keeps in memory (the index dump).
    pub async fn shutdown(self) -> std::io::Result<()> {
        let pipeline = self.state.pipeline.get().cloned();
        let served = self.http.shutdown().await;
        if let Some(pipeline) = pipeline {
            if let Err(e) = pipeline.flush().await {
                tracing::warn!(error = %e, "cannot write the index dump");
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
    let http = Http::bind(
        &config.server,
        &config.auth,
        RequestLimits::new(&config.generation, &config.retrieval),
    )
    .await?;
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let state = http.state.clone();
    let slot = Arc::clone(&state.pipeline);
    let sources_slot = Arc::clone(&state.sources);
    tokio::spawn(async move {
        let result = async {
            let pipeline = Arc::new(load(&config).await?);
            let sources =
                ragd_sources::Sources::start(Arc::clone(&pipeline), config.sources.clone())
                    .await
                    .map_err(|e| StartError::Sources(e.to_string()))?;
            let _ = sources_slot.set(sources);
            let _ = slot.set(pipeline);
            tracing::info!("ready");
            Ok(())
        }
        .await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "start-up failed");
        }
        let _ = loaded_tx.send(result);
    });
    Ok(Server {
        addr: http.addr,
        state,
        http,
        loaded: Some(loaded_rx),
    })
}

/// The embedder, with its batch sizes counted in the metrics: the one in
/// `dir`, configured by `[embedder]` (`primary`) or with the model's own
/// window and prefixes.
fn spawn_embedder(
    config: &Config,
    dir: &std::path::Path,
    primary: bool,
) -> oneshot::Receiver<Result<LocalEmbedder, ragd_backends::LoadError>> {
    let observe: ragd_backends::BatchObserver =
        Arc::new(|n| ragd_server::metrics::get().embedding_batch(n));
    let settings = if primary {
        config.embedder.local()
    } else {
        ragd_embedder::EmbedderConfig {
            batch_size: config.embedder.batch_size,
            int8: config.embedder.int8,
            ..Default::default()
        }
    };
    LocalEmbedder::spawn(dir.to_path_buf(), settings, Some(observe))
}

/// The configured embedders, loaded side by side, behind one router.
async fn load_embedders(config: &Config) -> Result<Arc<RoutedEmbedder>, StartError> {
    let remote = config.embedder.backend == "openai";
    let primary = (!remote).then(|| spawn_embedder(config, &config.models.embedder, true));
    let multilingual = (!config.models.multilingual_embedder.as_os_str().is_empty())
        .then(|| spawn_embedder(config, &config.models.multilingual_embedder, false));
    let primary: Arc<dyn Embed> = match primary {
        Some(local) => Arc::new(
            local
                .await
                .map_err(|_| StartError::Stopped("embedder thread"))??,
        ),
        None => Arc::new(
            ragd_backends::RemoteEmbedder::connect(
                &config.models.embedder,
                &config.embedder.local(),
                config.embedder.remote(),
            )
            .await?,
        ),
    };
    let multilingual: Option<Arc<dyn Embed>> = match multilingual {
        Some(rx) => Some(Arc::new(
            rx.await
                .map_err(|_| StartError::Stopped("embedder thread"))??,
        )),
        None => None,
    };
    Ok(Arc::new(RoutedEmbedder::new(primary, multilingual)))
}

/// Opens the configured store for `embedder`'s vectors: PostgreSQL, or the
/// SQLite database in the data directory (blocking work, off the runtime).
async fn open_store(
    config: &Config,
    embedder: &dyn Embed,
) -> Result<Arc<dyn DocumentStore>, StartError> {
    let info = embedder.info();
    if config.store.backend == "postgres" {
        let pg = PgConfig {
            url: config.store.url.clone(),
            max_connections: config.store.max_connections,
            connect_timeout_s: config.store.connect_timeout_s,
            hnsw_m: config.index.max_connections,
            hnsw_ef_construction: config.index.ef_construction,
            hnsw_ef_search: config.index.ef_search,
        };
        let store = PgStore::open(&pg, &info.identity(), info.dim)
            .await
            .map_err(ragd_backends::LoadError::from)?;
        return Ok(Arc::new(store));
    }
    let (dir, identity, dim, index) = (
        config.server.data_dir.clone(),
        info.identity(),
        info.dim,
        config.index.clone(),
    );
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir, &identity, dim, index))
        .await
        .map_err(|_| StartError::Stopped("store loader"))??;
    Ok(Arc::new(store))
}

/// Loads the engines the configuration names and assembles the pipeline.
async fn load(config: &Config) -> Result<Pipeline, StartError> {
    let embedder = load_embedders(config);
    let generator = if config.generation.backend == "openai" {
        None
    } else {
        Some(LocalGenerator::spawn(LocalOptions {
            path: config.models.generator.clone(),
            queue_size: config.generation.queue_size,
            slots: config.generation.slots,
            requantize: config.generation.requantize,
            prepared_weights: config.generation.prepared_weights,
            draft_tokens: config.generation.draft_tokens,
            prefix_samples: vec![
                ragd_pipeline::prompt::prefix_samples(),
                ragd_pipeline::translate::prefix_samples(),
            ],
        }))
    };
    let embedder = embedder.await?;
    let generator: Arc<dyn Generate> = match generator {
        Some(local) => Arc::new(
            local
                .await
                .map_err(|_| StartError::Stopped("generator thread"))??,
        ),
        None => Arc::new(RemoteGenerator::spawn(
            config.remote.clone(),
            config.generation.queue_size,
            config.generation.slots,
        )?),
    };
    let store = open_store(config, &*embedder).await?;
    Ok(Pipeline::new(
        config.pipeline(),
        Engines {
            embedder,
            generator: Some(generator),
            reranker: Arc::new(NoRerank),
            store,
        },
    )?)
}

/// Opens the data directory with every engine the configuration names, for
/// evaluation without a server (retrieval translates questions with the
/// answer model when `retrieval.translate_queries` is on). The same caveat as
/// [`open_for_ingest`] holds.
pub async fn open_for_eval(config: Config) -> Result<Arc<Pipeline>, StartError> {
    Ok(Arc::new(load(&config).await?))
}

/// Opens the data directory with the embedder only, for ingesting without a
/// server (`ragd ingest`, `ragd eval retrieval`). Do not run it on a data
/// directory a server is using: the server would not see the new documents
/// until it restarts. With `ingest.generate_questions` the answer model is
/// loaded too: it writes the questions.
pub async fn open_for_ingest(config: Config) -> Result<Arc<Pipeline>, StartError> {
    if config.ingest.generate_questions > 0 {
        return open_for_eval(config).await;
    }
    let embedder = load_embedders(&config).await?;
    let store = open_store(&config, &*embedder).await?;
    Ok(Arc::new(Pipeline::new(
        config.pipeline(),
        Engines {
            embedder,
            generator: None,
            reranker: Arc::new(NoRerank),
            store,
        },
    )?))
}
