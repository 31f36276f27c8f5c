//! The whole pipeline on small in-memory engines: a bag-of-words embedder, a
//! map of documents, a scripted generator. No model is loaded; what is tested
//! is the flow — what is stored, what the model is shown, what the client
//! receives.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ragd_core::{
    async_trait, BackendError, CollectionInfo, DocumentInfo, DocumentStore, Embed, Embedded,
    EmbedderInfo, Filter, FinishReason, GenEvent, GenJob, Generate, Generation, GeneratorInfo, Hit,
    NewDocument, NoRerank, Prompt, QueueFull, Rerank, SlotLoad, StoreStats, StoredChunk, TextKind,
    UpsertFailure, UpsertStatus, DEFAULT_COLLECTION,
};
use serde_json::json;

use crate::answer::AnswerEvent;
use crate::ask::AskRequest;
use crate::config::{
    AnswersConfig, ChunkerConfig, GenerationConfig, PipelineConfig, RetrievalConfig,
};
use crate::ingest::{IngestRequest, IngestStatus};
use crate::retrieve::{Fusion, Mode};
use crate::{Engines, Error, Pipeline};

const DIM: usize = 1024;

/// Words as tokens; vectors are normalised bags of hashed words, so texts
/// sharing words are close.
#[derive(Debug, Default)]
struct WordEmbedder {
    fail: AtomicBool,
    embedded: AtomicUsize,
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn bag(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; DIM];
    for w in words(text) {
        let h = w
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        v[(h % DIM as u64) as usize] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter().map(|x| x / norm).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

static WORD_EMBEDDER: std::sync::OnceLock<EmbedderInfo> = std::sync::OnceLock::new();

#[async_trait]
impl Embed for WordEmbedder {
    fn info(&self) -> &EmbedderInfo {
        WORD_EMBEDDER.get_or_init(|| EmbedderInfo {
            name: "bag-of-words".into(),
            dim: DIM,
            max_length: 512,
            query_prefix: String::new(),
            passage_prefix: String::new(),
            multilingual: true,
        })
    }

    fn count_tokens(&self, text: &str) -> usize {
        words(text).len()
    }

    async fn embed(&self, _: TextKind, texts: Vec<String>) -> Result<Vec<Vec<f32>>, BackendError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendError::server("the embedder broke"));
        }
        self.embedded.fetch_add(texts.len(), Ordering::SeqCst);
        Ok(texts.iter().map(|t| bag(t)).collect())
    }
}

/// Documents and chunks in maps; search is exact.
#[derive(Debug, Default)]
struct MemoryStore {
    data: Mutex<Memory>,
}

/// A document's key: its collection and id.
type DocKey = (String, String);

#[derive(Debug, Default)]
struct Memory {
    documents: BTreeMap<DocKey, NewDocument>,
    /// key → (document, chunk index)
    chunks: BTreeMap<usize, (DocKey, usize)>,
    /// Collections besides `default`.
    collections: std::collections::BTreeSet<String>,
    next_key: usize,
    /// Kept summaries: (document, key) → (content hash, summary).
    summaries: BTreeMap<(DocKey, String), (String, String)>,
}

fn key(collection: &str, id: &str) -> DocKey {
    (collection.to_string(), id.to_string())
}

impl Memory {
    fn chunk(&self, key: usize) -> Option<StoredChunk> {
        let (doc, i) = self.chunks.get(&key)?;
        let d = self.documents.get(doc)?;
        let c = d.chunks.get(*i)?;
        Some(StoredChunk {
            key,
            collection: doc.0.clone(),
            document_id: doc.1.clone(),
            index: *i,
            title: d.title.clone(),
            section: c.section.clone(),
            text: c.text.clone(),
            start: c.start,
            end: c.end,
            vector: c.vector.clone(),
        })
    }

    fn passing<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = StoredChunk> + 'a {
        self.chunks.keys().filter_map(move |&k| {
            let c = self.chunk(k)?;
            let d = self.documents.get(&key(&c.collection, &c.document_id))?;
            filter
                .matches(&d.collection, &d.id, Some(&d.metadata))
                .then_some(c)
        })
    }

    fn info(&self, d: &NewDocument) -> DocumentInfo {
        DocumentInfo {
            collection: d.collection.clone(),
            id: d.id.clone(),
            title: d.title.clone(),
            metadata: d.metadata.clone(),
            hash: d.hash.clone(),
            chunks: d.chunks.len(),
            text_bytes: d.text.len(),
            created_at: 0,
            updated_at: 0,
        }
    }
}

fn ranked(mut hits: Vec<Hit>, k: usize) -> Vec<Hit> {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    hits.truncate(k);
    hits
}

#[async_trait]
impl DocumentStore for MemoryStore {
    async fn prior_versions(
        &self,
        collection: &str,
        documents: &[(String, String)],
    ) -> Result<Vec<Option<HashMap<String, Embedded>>>, BackendError> {
        let m = self.data.lock().unwrap();
        Ok(documents
            .iter()
            .map(|(id, hash)| match m.documents.get(&key(collection, id)) {
                Some(d) if &d.hash == hash => None,
                Some(d) => Some(
                    d.chunks
                        .iter()
                        .map(|c| {
                            let e = Embedded {
                                vector: c.vector.clone(),
                                questions: c.questions.clone(),
                            };
                            (c.embed_hash.clone(), e)
                        })
                        .collect(),
                ),
                None => Some(HashMap::new()),
            })
            .collect())
    }

    async fn upsert(
        &self,
        documents: Vec<NewDocument>,
    ) -> Result<Vec<Result<UpsertStatus, UpsertFailure>>, BackendError> {
        let mut m = self.data.lock().unwrap();
        let mut out = Vec::new();
        for d in documents {
            if d.chunks.iter().any(|c| c.vector.len() != DIM) {
                out.push(Err(UpsertFailure::Vector("wrong size".into())));
                continue;
            }
            if d.collection != DEFAULT_COLLECTION && !m.collections.contains(&d.collection) {
                out.push(Err(UpsertFailure::Storage("no such collection".into())));
                continue;
            }
            let k = key(&d.collection, &d.id);
            let status = match m.documents.get(&k) {
                Some(old) if old.hash == d.hash => {
                    out.push(Ok(UpsertStatus::Unchanged));
                    continue;
                }
                Some(_) => UpsertStatus::Updated,
                None => UpsertStatus::Created,
            };
            m.chunks.retain(|_, (doc, _)| doc != &k);
            for i in 0..d.chunks.len() {
                let chunk_key = m.next_key;
                m.next_key += 1;
                m.chunks.insert(chunk_key, (k.clone(), i));
            }
            m.documents.insert(k, d);
            out.push(Ok(status));
        }
        Ok(out)
    }

    async fn delete(&self, collection: &str, id: &str) -> Result<bool, BackendError> {
        let mut m = self.data.lock().unwrap();
        let k = key(collection, id);
        m.chunks.retain(|_, (d, _)| d != &k);
        Ok(m.documents.remove(&k).is_some())
    }

    async fn document_chunks(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Vec<StoredChunk>, BackendError> {
        let m = self.data.lock().unwrap();
        let k = key(collection, id);
        let mut keys: Vec<(usize, usize)> = m
            .chunks
            .iter()
            .filter(|(_, (d, _))| d == &k)
            .map(|(&key, (_, i))| (*i, key))
            .collect();
        keys.sort_unstable();
        Ok(keys
            .into_iter()
            .filter_map(|(_, key)| m.chunk(key))
            .collect())
    }

    async fn cached_summary(
        &self,
        collection: &str,
        id: &str,
        summary_key: &str,
    ) -> Result<Option<String>, BackendError> {
        let m = self.data.lock().unwrap();
        let k = key(collection, id);
        let current = m.documents.get(&k).map(|d| d.hash.clone());
        Ok(m.summaries
            .get(&(k, summary_key.to_string()))
            .filter(|(hash, _)| Some(hash) == current.as_ref())
            .map(|(_, s)| s.clone()))
    }

    async fn keep_summary(
        &self,
        collection: &str,
        id: &str,
        hash: &str,
        summary_key: &str,
        summary: &str,
    ) -> Result<(), BackendError> {
        let mut m = self.data.lock().unwrap();
        let k = key(collection, id);
        if m.documents.get(&k).is_some_and(|d| d.hash == hash) {
            m.summaries.insert(
                (k, summary_key.to_string()),
                (hash.to_string(), summary.to_string()),
            );
        }
        Ok(())
    }

    async fn document(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<DocumentInfo>, BackendError> {
        let m = self.data.lock().unwrap();
        Ok(m.documents.get(&key(collection, id)).map(|d| m.info(d)))
    }

    async fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DocumentInfo>, BackendError> {
        let m = self.data.lock().unwrap();
        Ok(m.documents
            .values()
            .filter(|d| d.collection == collection)
            .filter(|d| after.is_none_or(|a| d.id.as_str() > a))
            .take(limit)
            .map(|d| m.info(d))
            .collect())
    }

    async fn collections(&self) -> Result<Vec<CollectionInfo>, BackendError> {
        let m = self.data.lock().unwrap();
        let mut names: Vec<String> = m.collections.iter().cloned().collect();
        names.push(DEFAULT_COLLECTION.into());
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| CollectionInfo {
                documents: m.documents.keys().filter(|(c, _)| *c == name).count(),
                name,
                created_at: 0,
            })
            .collect())
    }

    async fn collection_exists(&self, name: &str) -> Result<bool, BackendError> {
        let m = self.data.lock().unwrap();
        Ok(name == DEFAULT_COLLECTION || m.collections.contains(name))
    }

    async fn create_collection(&self, name: &str) -> Result<bool, BackendError> {
        let mut m = self.data.lock().unwrap();
        Ok(name != DEFAULT_COLLECTION && m.collections.insert(name.to_string()))
    }

    async fn delete_collection(&self, name: &str) -> Result<Option<usize>, BackendError> {
        let mut m = self.data.lock().unwrap();
        if !m.collections.remove(name) {
            return Ok(None);
        }
        m.chunks.retain(|_, (d, _)| d.0 != name);
        let before = m.documents.len();
        m.documents.retain(|(c, _), _| c != name);
        Ok(Some(before - m.documents.len()))
    }

    async fn dense_search(
        &self,
        vector: &[f32],
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError> {
        let m = self.data.lock().unwrap();
        let hits = m
            .passing(filter)
            .map(|c| Hit {
                id: c.key,
                score: cosine(&c.vector, vector),
            })
            .collect();
        Ok(ranked(hits, k))
    }

    async fn lexical_search(
        &self,
        query: &str,
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError> {
        let m = self.data.lock().unwrap();
        let q = words(query);
        let hits = m
            .passing(filter)
            .filter_map(|c| {
                // As the real store: generated questions are indexed with the text.
                let (doc, i) = &m.chunks[&c.key];
                let questions = m.documents[doc].chunks[*i].questions.join(" ");
                let w = words(&format!("{} {questions}", c.text));
                let shared = q.iter().filter(|t| w.contains(t)).count();
                (shared > 0).then_some(Hit {
                    id: c.key,
                    score: shared as f32,
                })
            })
            .collect();
        Ok(ranked(hits, k))
    }

    async fn chunks(&self, keys: &[usize]) -> Result<Vec<StoredChunk>, BackendError> {
        let m = self.data.lock().unwrap();
        Ok(keys.iter().filter_map(|&k| m.chunk(k)).collect())
    }

    async fn stats(&self) -> Result<StoreStats, BackendError> {
        let m = self.data.lock().unwrap();
        Ok(StoreStats {
            documents: m.documents.len(),
            chunks: m.chunks.len(),
            index_at_start: None,
        })
    }

    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// What the scripted generator does with a job.
#[derive(Debug, Clone)]
enum Script {
    /// Streams these pieces, then finishes.
    Answer(Vec<&'static str>),
    /// Streams these pieces, then fails as the server's fault.
    FailAfter(Vec<&'static str>),
}

/// Answers every job from a script, and keeps the prompts it was given.
#[derive(Debug)]
struct ScriptedGenerator {
    script: Script,
    prompts: Mutex<Vec<Prompt>>,
    info: GeneratorInfo,
}

impl ScriptedGenerator {
    fn new(script: Script) -> Self {
        Self {
            script,
            prompts: Mutex::new(Vec::new()),
            info: GeneratorInfo {
                name: "scripted".into(),
                context: 4096,
                slots: 1,
                fits_context: true,
                steers: true,
            },
        }
    }

    fn prompts(&self) -> Vec<Prompt> {
        self.prompts.lock().unwrap().clone()
    }
}

impl Generate for ScriptedGenerator {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn load(&self) -> SlotLoad {
        SlotLoad {
            slots: 1,
            busy: 0,
            waiting: 0,
        }
    }

    fn submit(&self, job: GenJob) -> Result<usize, QueueFull> {
        self.prompts.lock().unwrap().push(job.prompt.clone());
        let events = job.events;
        let used = job.prompt.passages.len();
        let _ = events.send(GenEvent::Prompt {
            passages_used: used,
            trimmed: false,
            prompt_tokens: 100,
            prompt_ms: 0.1,
        });
        let (pieces, fail) = match &self.script {
            Script::Answer(p) => (p.clone(), false),
            Script::FailAfter(p) => (p.clone(), true),
        };
        for p in &pieces {
            let _ = events.send(GenEvent::Token(p.to_string()));
        }
        let _ = events.send(if fail {
            GenEvent::Failed(BackendError::server("the model broke"))
        } else {
            GenEvent::Done(Generation {
                text: pieces.concat(),
                prompt_tokens: 100,
                completion_tokens: pieces.len(),
                finish_reason: FinishReason::Stop,
                prefill_ms: 1.0,
                decode_ms: 1.0,
                cached_tokens: 0,
                drafted_tokens: 0,
                accepted_tokens: 0,
            })
        });
        Ok(0)
    }
}

/// Reverses retrieval's order: shows that the rerank stage decides what the
/// model reads.
#[derive(Debug)]
struct Reverse;

#[async_trait]
impl Rerank for Reverse {
    fn name(&self) -> &str {
        "reverse"
    }

    async fn rerank(&self, _: &str, passages: &[&str]) -> Result<Vec<usize>, BackendError> {
        Ok((0..passages.len()).rev().collect())
    }
}

fn config(redact: &[&str]) -> PipelineConfig {
    PipelineConfig {
        retrieval: RetrievalConfig {
            top_k: 2,
            max_top_k: 20,
            min_score: Some(0.1),
            abstain_below: Some(0.3),
            multilingual_min_score: Some(0.1),
            multilingual_abstain_below: Some(0.3),
            mode: Mode::Hybrid,
            fusion: Fusion::Convex,
            dense_weight: 0.5,
            candidates: 20,
            translate_queries: false,
            evidence_tokens: 0,
        },
        generation: GenerationConfig {
            max_tokens: 64,
            concise_max_tokens: 32,
            max_tokens_limit: 256,
            temperature: 0.0,
            top_p: 0.9,
            top_k: 0,
            seed: 1,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            backend: "local".into(),
            queue_size: 4,
            slots: 1,
            requantize: false,
            prepared_weights: true,
            max_context_tokens: 0,
            draft_tokens: 8,
            timeout_s: 60.0,
        },
        answers: AnswersConfig {
            min_support: 0.3,
            redact: redact.iter().map(|s| s.to_string()).collect(),
            block_terms: Vec::new(),
        },
        chunking: ChunkerConfig {
            max_tokens: 40,
            overlap: 0,
        },
        max_documents_per_request: 10,
        generate_questions: 0,
    }
}

struct Setup {
    pipeline: Pipeline,
    embedder: Arc<WordEmbedder>,
    generator: Arc<ScriptedGenerator>,
}

fn setup(script: Script, redact: &[&str], reranker: Arc<dyn Rerank>) -> Setup {
    setup_with(config(redact), script, reranker)
}

fn setup_with(config: PipelineConfig, script: Script, reranker: Arc<dyn Rerank>) -> Setup {
    let embedder = Arc::new(WordEmbedder::default());
    let generator = Arc::new(ScriptedGenerator::new(script));
    let pipeline = Pipeline::new(
        config,
        Engines {
            embedder: Arc::new(crate::route::RoutedEmbedder::new(embedder.clone(), None)),
            generator: Some(generator.clone()),
            reranker,
            store: Arc::new(MemoryStore::default()),
        },
    )
    .unwrap();
    Setup {
        pipeline,
        embedder,
        generator,
    }
}

fn documents() -> IngestRequest {
    serde_json::from_value(json!({ "documents": [
        { "id": "cats", "title": "Cats", "text": "Cats sleep sixteen hours a day. Cats purr when content." },
        { "id": "tea", "title": "Tea", "text": "Green tea is steeped at eighty degrees for two minutes." },
        { "id": "rust", "title": "Rust", "text": "Rust checks borrowing at compile time without a garbage collector." }
    ]}))
    .unwrap()
}

fn ask(question: &str) -> AskRequest {
    serde_json::from_value(json!({ "question": question })).unwrap()
}

async fn events(pipeline: &Pipeline, question: &str) -> Vec<AnswerEvent> {
    let mut answer = pipeline.ask(&ask(question)).await.unwrap();
    let mut out = Vec::new();
    while let Some(e) = answer.next().await {
        out.push(e);
    }
    out
}

/// The text of an answer's `Token` events.
fn streamed(events: &[AnswerEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            AnswerEvent::Token(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

/// The answer a stream ended with.
fn done(events: &[AnswerEvent]) -> &crate::AskResponse {
    match events.last() {
        Some(AnswerEvent::Done(done)) => done,
        _ => panic!("no done event: {events:?}"),
    }
}

#[tokio::test]
async fn ingest_creates_then_finds_unchanged_then_updates_only_what_changed() {
    let s = setup(Script::Answer(vec![]), &[], Arc::new(NoRerank));
    let first = s.pipeline.ingest(documents()).await.unwrap();
    let statuses: Vec<_> = first.documents.iter().map(|d| d.status).collect();
    assert_eq!(statuses, vec![IngestStatus::Created; 3]);
    assert!(first
        .documents
        .iter()
        .all(|d| d.chunks == 1 && d.embedded == 1));
    let embedded = s.embedder.embedded.load(Ordering::SeqCst);

    let again = s.pipeline.ingest(documents()).await.unwrap();
    assert!(again
        .documents
        .iter()
        .all(|d| d.status == IngestStatus::Unchanged && d.chunks == 1 && d.embedded == 0));
    assert_eq!(
        s.embedder.embedded.load(Ordering::SeqCst),
        embedded,
        "unchanged documents are not embedded again"
    );

    let mut changed = documents();
    changed.documents[1].text = "Black tea is steeped in boiling water for four minutes.".into();
    let updated = s.pipeline.ingest(changed).await.unwrap();
    let statuses: Vec<_> = updated.documents.iter().map(|d| d.status).collect();
    assert_eq!(
        statuses,
        vec![
            IngestStatus::Unchanged,
            IngestStatus::Updated,
            IngestStatus::Unchanged
        ]
    );
    assert_eq!(updated.documents[1].embedded, 1);
    assert_eq!(s.embedder.embedded.load(Ordering::SeqCst), embedded + 1);
    let tea = s.pipeline.get_document("tea").await.unwrap();
    assert_eq!(tea.chunks, 1);
}

/// A collection holds its own documents: the same id in two, each found
/// only through its own; asking a missing one (or one deleted) is 404 with
/// nothing written; `default` cannot be deleted.
#[tokio::test]
async fn collections_keep_their_documents_apart() {
    use crate::collections::CreateCollection;
    let s = setup(
        Script::Answer(vec!["Cats sleep a lot [1]."]),
        &[],
        Arc::new(NoRerank),
    );
    let p = &s.pipeline;
    let create = |name: &str| CreateCollection { name: name.into() };
    assert!(p.create_collection(create("team-a")).await.unwrap().created);
    assert!(!p.create_collection(create("team-a")).await.unwrap().created);
    assert!(matches!(
        p.create_collection(create("../x")).await,
        Err(Error::Invalid(_))
    ));
    p.ingest(documents()).await.unwrap();
    let other = IngestRequest {
        documents: vec![serde_json::from_value(
            json!({ "id": "cats", "text": "Zebras graze on the open savanna all day." }),
        )
        .unwrap()],
    };
    p.ingest_into("team-a", other.clone()).await.unwrap();
    let search = |q: &str| -> crate::search::SearchRequest {
        serde_json::from_value(json!({ "query": q, "top_k": 10 })).unwrap()
    };
    let in_a = p
        .search_in("team-a", search("zebras savanna cats"))
        .await
        .unwrap();
    assert!(!in_a.results.is_empty());
    assert!(
        in_a.results.iter().all(|r| r.text.contains("Zebras")),
        "{:?}",
        in_a.results
    );
    let in_default = p.search(search("zebras savanna")).await.unwrap();
    assert!(in_default
        .results
        .iter()
        .all(|r| !r.text.contains("Zebras")));
    assert_eq!(
        p.list_documents_in("team-a", None, None)
            .await
            .unwrap()
            .documents
            .len(),
        1
    );
    assert_ne!(
        p.get_document_in("team-a", "cats").await.unwrap().hash,
        p.get_document("cats").await.unwrap().hash
    );
    for missing in ["nope", "../etc"] {
        let e = p.ingest_into(missing, other.clone()).await.unwrap_err();
        assert!(
            matches!(&e, Error::NotFound(m) if m.contains("no collection")),
            "{e}"
        );
        assert!(matches!(
            p.search_in(missing, search("x")).await,
            Err(Error::NotFound(_))
        ));
    }
    assert_eq!(p.delete_collection("team-a").await.unwrap().documents, 1);
    assert!(matches!(
        p.delete_collection("team-a").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        p.delete_collection("default").await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        p.search_in("team-a", search("zebras")).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(p.collections().await.unwrap().len(), 1);
}

/// With `generate_questions`, the model's questions for each new chunk are
/// stored, found by lexical search, reused while the chunk's text is
/// unchanged, and never put in front of the model as passage text.
#[tokio::test]
async fn generated_questions_find_their_chunk_and_are_reused() {
    let mut c = config(&[]);
    c.generate_questions = 2;
    let reply = "1. Which zebra naps longest?\n2. Why?\n3. How long do felines doze?\n4. Extra?";
    let s = setup_with(c, Script::Answer(vec![reply]), Arc::new(NoRerank));
    s.pipeline.ingest(documents()).await.unwrap();
    assert_eq!(s.generator.prompts().len(), 3, "one generation per chunk");
    let search = |mode: &str| {
        let req: crate::search::SearchRequest =
            serde_json::from_value(json!({ "query": "zebra", "mode": mode, "top_k": 3 })).unwrap();
        s.pipeline.search(req)
    };
    let found = search("lexical").await.unwrap();
    assert_eq!(found.results.len(), 3, "a question's word finds the chunks");
    assert!(
        found.results.iter().all(|r| !r.text.contains("zebra")),
        "the questions are not passage text"
    );
    // Nor are they embedded with it: no vector knows the word.
    let found = search("dense").await.unwrap();
    assert!(
        found.results.iter().all(|r| r.score.abs() < 1e-3),
        "{:?}",
        found.results
    );
    // A metadata change keeps every chunk's text: nothing is generated again.
    let mut changed = documents();
    changed.documents[0].metadata = Some(serde_json::Map::from_iter([("k".into(), json!(1))]));
    let updated = s.pipeline.ingest(changed).await.unwrap();
    assert_eq!(updated.documents[0].status, IngestStatus::Updated);
    assert_eq!(updated.documents[0].embedded, 0);
    assert_eq!(s.generator.prompts().len(), 3, "questions are reused");
    assert_eq!(search("lexical").await.unwrap().results.len(), 3);
    // The answer's prompt holds passages, not questions.
    let e = events(&s.pipeline, "How long do cats sleep?").await;
    let prompt = s.generator.prompts().pop().unwrap();
    assert!(
        prompt.passages.iter().all(|p| !p.text.contains("zebra")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_failing_embedder_changes_nothing() {
    let s = setup(Script::Answer(vec![]), &[], Arc::new(NoRerank));
    s.embedder.fail.store(true, Ordering::SeqCst);
    let e = s.pipeline.ingest(documents()).await.unwrap_err();
    assert!(matches!(e, Error::Internal(_)), "{e:?}");
    assert!(s
        .pipeline
        .list_documents(None, None)
        .await
        .unwrap()
        .documents
        .is_empty());
    // Nor does a bad request: all documents are checked before any is stored.
    s.embedder.fail.store(false, Ordering::SeqCst);
    let mut bad = documents();
    bad.documents[2].text = "  ".into();
    assert!(matches!(
        s.pipeline.ingest(bad).await,
        Err(Error::Invalid(m)) if m.contains("documents[2].text")
    ));
    assert_eq!(s.pipeline.status().await.documents, Some(0));
}

#[tokio::test]
async fn a_question_the_documents_do_not_answer_is_declined_without_the_model() {
    let s = setup(Script::Answer(vec!["never"]), &[], Arc::new(NoRerank));
    s.pipeline.ingest(documents()).await.unwrap();
    let events = events(&s.pipeline, "珠穆朗玛峰有多高？").await;
    assert!(matches!(&events[0], AnswerEvent::Sources(s) if s.is_empty()));
    let AnswerEvent::Done(done) = &events[1] else {
        panic!("{events:?}")
    };
    assert!(!done.answerable);
    assert_eq!(done.finish_reason, "no_sources");
    assert_eq!(done.language.question, crate::language::Lang::Zh);
    assert_eq!(done.answer, crate::language::Lang::Zh.not_in_documents());
    assert_eq!(events.len(), 2);
    assert!(s.generator.prompts().is_empty(), "the model was not asked");
}

#[tokio::test]
async fn the_model_is_shown_the_best_passages_numbered_and_cites_them() {
    let s = setup(
        Script::Answer(vec!["Cats sleep ", "sixteen hours a day [1]."]),
        &[],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(documents()).await.unwrap();
    let events = events(&s.pipeline, "How many hours do cats sleep a day?").await;
    let prompts = s.generator.prompts();
    assert_eq!(prompts.len(), 1);
    let p = &prompts[0];
    assert!(!p.passages.is_empty() && p.passages.len() <= 2, "top_k = 2");
    assert!(p.passages[0].heading.starts_with("[1] (Cats)"), "{p:?}");
    assert!(p.passages[0].text.contains("sixteen hours"));
    assert!(p
        .close
        .contains("Question: How many hours do cats sleep a day?"));
    assert!(p.close.contains("in English"));
    // The client sees the same passages, then the text, then the checked answer.
    let AnswerEvent::Sources(sources) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(sources[0].document_id, "cats");
    assert_eq!(sources.len(), p.passages.len());
    let text = streamed(&events);
    assert_eq!(text, "Cats sleep sixteen hours a day [1].");
    let done = done(&events);
    assert!(done.answerable);
    assert_eq!(done.answer_kind, crate::AnswerKind::Generated);
    assert_eq!(
        done.answer, text,
        "a supported answer is delivered as written"
    );
    assert!(done.model_answer.is_none());
    assert_eq!(done.citations[0].document_id, "cats");
    assert_eq!(done.finish_reason, "stop");
    assert!(done.grounding.as_ref().is_some_and(|g| g.supported));
}

#[tokio::test]
async fn evidence_selection_shows_the_model_only_the_strips_that_bear_on_the_question() {
    let mut c = config(&[]);
    c.retrieval.evidence_tokens = 12;
    c.chunking.max_tokens = 200;
    let s = setup_with(
        c,
        Script::Answer(vec!["Cats sleep sixteen hours a day [1]."]),
        Arc::new(NoRerank),
    );
    let text = "Cats are small carnivores that people keep as pets all over the world. \
                Cats sleep sixteen hours a day, mostly in the warm afternoon. \
                Their whiskers sense the slightest air currents around them.";
    let docs = serde_json::from_value(json!({ "documents": [
        { "id": "cats", "title": "Cats", "text": text }
    ]}))
    .unwrap();
    s.pipeline.ingest(docs).await.unwrap();
    let events = events(&s.pipeline, "How many hours do cats sleep a day?").await;
    let p = &s.generator.prompts()[0];
    let strip = "Cats sleep sixteen hours a day, mostly in the warm afternoon.";
    assert_eq!(p.passages.len(), 1, "{p:?}");
    assert_eq!(p.passages[0].text, strip);
    let AnswerEvent::Sources(sources) = &events[0] else {
        panic!("{events:?}")
    };
    // The response says which strip of the document the model read.
    let e = &sources[0].evidence;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(&text[e[0].start..e[0].end], strip);
    assert_eq!(done(&events).answer_kind, crate::AnswerKind::Generated);
}

#[tokio::test]
async fn an_unsupported_answer_is_replaced_by_a_quote_from_the_top_passage() {
    let s = setup(
        Script::Answer(vec!["Penguins live ", "at the south pole [1]."]),
        &[],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(documents()).await.unwrap();
    let events = events(&s.pipeline, "How many hours do cats sleep a day?").await;
    let streamed = streamed(&events);
    let done = done(&events);
    assert_eq!(done.answer_kind, crate::AnswerKind::Extractive, "{done:?}");
    assert_eq!(done.answer, "“Cats sleep sixteen hours a day.” [1]");
    assert!(done.answerable);
    // The client is told what the streamed text was replaced with (after the
    // check took out the marker no passage supports).
    assert_eq!(streamed, "Penguins live at the south pole [1].");
    assert_eq!(
        done.model_answer.as_deref(),
        Some("Penguins live at the south pole.")
    );
    assert!(done.grounding.as_ref().is_some_and(|g| g.supported));
    assert_eq!(done.citations.len(), 1);
    assert_eq!(done.citations[0].document_id, "cats");
    assert_eq!(
        done.citations[0].cited_by,
        Some(crate::check::CitedBy::Quoted)
    );
}

#[tokio::test]
async fn an_unsupported_answer_with_no_sentence_sharing_the_question_words_is_declined() {
    let s = setup(
        Script::Answer(vec!["Penguins live at the south pole [1]."]),
        &[],
        Arc::new(NoRerank),
    );
    // Found by its title; no sentence of its text shares a word with the question.
    let docs = serde_json::from_value(json!({ "documents": [
        { "id": "birds", "title": "Emperor penguin facts", "text": "They swim fast. They eat krill." }
    ]}))
    .unwrap();
    s.pipeline.ingest(docs).await.unwrap();
    let answer = s.pipeline.ask(&ask("emperor penguin facts")).await.unwrap();
    let done = answer.collect().await.unwrap();
    assert_eq!(s.generator.prompts().len(), 1, "the model was asked");
    assert_eq!(done.answer_kind, crate::AnswerKind::Declined, "{done:?}");
    assert!(!done.answerable);
    assert_eq!(
        done.model_answer.as_deref(),
        Some("Penguins live at the south pole.")
    );
}

#[tokio::test]
async fn a_refusal_is_declined_in_the_question_language() {
    let s = setup(
        Script::Answer(vec!["I don't know."]),
        &[],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(documents()).await.unwrap();
    let answer = s
        .pipeline
        .ask(&ask("How long do cats sleep?"))
        .await
        .unwrap();
    let done = answer.collect().await.unwrap();
    assert_eq!(done.answer_kind, crate::AnswerKind::Declined);
    assert!(!done.answerable);
    assert_eq!(done.answer, crate::language::Lang::En.not_in_documents());
    assert_eq!(done.model_answer.as_deref(), Some("I don't know."));
    assert!(done.citations.is_empty());
    assert_eq!(done.finish_reason, "stop", "the model was asked");
}

#[tokio::test]
async fn the_rerank_stage_decides_the_order_the_model_reads() {
    let question = "Do cats purr, and how is green tea steeped?";
    let mut orders = Vec::new();
    for reranker in [Arc::new(NoRerank) as Arc<dyn Rerank>, Arc::new(Reverse)] {
        let s = setup(Script::Answer(vec!["Purring [2]."]), &[], reranker);
        s.pipeline.ingest(documents()).await.unwrap();
        let _ = events(&s.pipeline, question).await;
        let p = &s.generator.prompts()[0];
        assert_eq!(p.passages.len(), 2, "{p:?}");
        // Numbered by the order the model reads them, whatever it is.
        assert!(
            p.passages[0].heading.starts_with("[1]") && p.passages[1].heading.starts_with("[2]")
        );
        orders.push(
            p.passages
                .iter()
                .map(|x| x.text.clone())
                .collect::<Vec<_>>(),
        );
    }
    let mut reversed = orders[0].clone();
    reversed.reverse();
    assert_eq!(orders[1], reversed);
}

#[tokio::test]
async fn content_rules_apply_to_the_stream_even_across_pieces() {
    let s = setup(
        Script::Answer(vec![
            "Write to cats",
            "@example",
            ".org about ",
            "naps [1].",
        ]),
        &["email"],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(documents()).await.unwrap();
    let events = events(&s.pipeline, "How long do cats sleep?").await;
    let streamed = streamed(&events);
    assert!(!streamed.contains("example.org"), "{streamed}");
    assert!(streamed.contains("[email]"), "{streamed}");
    let done = done(&events);
    // Whether delivered or set aside, the model's text has the rules applied.
    let written = done.model_answer.as_deref().unwrap_or(&done.answer);
    assert!(written.contains("[email]"), "{written}");
    assert!(!done.answer.contains("example.org"), "{}", done.answer);
    assert!(done.content_rules.iter().any(|r| r.rule == "email"));
}

#[tokio::test]
async fn a_generator_error_mid_stream_becomes_an_error_event() {
    let s = setup(
        Script::FailAfter(vec!["Cats sleep "]),
        &[],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(documents()).await.unwrap();
    let events = events(&s.pipeline, "How long do cats sleep?").await;
    assert!(matches!(events[0], AnswerEvent::Sources(_)), "{events:?}");
    assert!(
        events.iter().any(|e| matches!(e, AnswerEvent::Token(_))),
        "{events:?}"
    );
    let Some(AnswerEvent::Failed(e)) = events.last() else {
        panic!("{events:?}")
    };
    assert!(matches!(e, Error::Internal(_)), "{e:?}");
    // The same answer read to its end without streaming is the error itself.
    let answer = s
        .pipeline
        .ask(&ask("How long do cats sleep?"))
        .await
        .unwrap();
    assert!(matches!(answer.collect().await, Err(Error::Internal(_))));
}

#[tokio::test]
async fn bad_questions_are_refused_before_anything_runs() {
    let s = setup(Script::Answer(vec![]), &[], Arc::new(NoRerank));
    for (body, needle) in [
        (json!({ "question": "  " }), "question"),
        (json!({ "question": "q", "top_k": 0 }), "top_k"),
        (json!({ "question": "q", "style": "verbose" }), "style"),
        (
            json!({ "question": "q", "filter": { "lang": "en" } }),
            "filter",
        ),
        (json!({ "question": "q", "mode": "fuzzy" }), "mode"),
        (
            json!({ "question": "q", "temperature": 3.0 }),
            "temperature",
        ),
    ] {
        let req: AskRequest = serde_json::from_value(body.clone()).unwrap();
        match s.pipeline.ask(&req).await {
            Err(Error::Invalid(m)) => assert!(m.contains(needle), "{body}: {m}"),
            other => panic!("{body}: {:?}", other.map(|_| ())),
        }
    }
    assert!(s.generator.prompts().is_empty());
}

/// Reads a summary to its end.
async fn summary_events(
    pipeline: &Pipeline,
    req: serde_json::Value,
) -> Result<Vec<AnswerEvent>, Error> {
    let req: crate::SummarizeRequest = serde_json::from_value(req).unwrap();
    let mut answer = pipeline.summarize(&req).await?;
    let mut out = Vec::new();
    while let Some(e) = answer.next().await {
        out.push(e);
    }
    Ok(out)
}

/// A document of several chunks (at the test config's 40 words a chunk).
fn long_cats() -> IngestRequest {
    let first = "Cats sleep sixteen hours a day and wake at dusk to hunt. ".repeat(4);
    let second = "Green tea is steeped at eighty degrees for two minutes exactly. ".repeat(4);
    let third = "Rust checks borrowing at compile time without a garbage collector. ".repeat(4);
    serde_json::from_value(json!({ "documents": [
        { "id": "long", "title": "Notes", "text": format!("{first}\n\n{second}\n\n{third}"),
          "metadata": { "kind": "notes" } },
        { "id": "other", "title": "Other", "text": "Owls hunt at night by sound alone.",
          "metadata": { "kind": "birds" } }
    ]}))
    .unwrap()
}

#[tokio::test]
async fn a_document_summary_reads_its_passages_in_order_and_keeps_only_supported_sentences() {
    let s = setup(
        Script::Answer(vec![
            "Cats sleep sixteen hours a day [1]. ",
            "Green tea is steeped at eighty degrees [3]. ",
            "The moon is made of blue cheese [2].",
        ]),
        &[],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(long_cats()).await.unwrap();
    let events = summary_events(&s.pipeline, json!({ "document_id": "long" }))
        .await
        .unwrap();
    let prompts = s.generator.prompts();
    assert_eq!(prompts.len(), 1, "a short document is one pass");
    let p = &prompts[0];
    let chunks = p.passages.len();
    assert!(chunks >= 3, "{p:?}");
    for (i, passage) in p.passages.iter().enumerate() {
        assert!(passage.heading.starts_with(&format!("[{}]", i + 1)));
    }
    assert!(
        p.passages[0].text.contains("Cats sleep"),
        "in the document's order"
    );
    assert!(p.passages[chunks - 1].text.contains("garbage collector"));
    assert!(p.close.contains("summarize") && p.close.contains("in English"));
    let AnswerEvent::Sources(sources) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(sources.len(), chunks);
    assert!(sources.iter().all(|s| s.document_id == "long"));
    let done = done(&events);
    assert_eq!(done.answer_kind, crate::AnswerKind::Generated);
    assert!(done.answer.contains("Cats sleep sixteen hours a day"));
    assert!(done.answer.contains("Green tea"));
    assert!(
        !done.answer.contains("moon"),
        "no passage supports it: left out: {}",
        done.answer
    );
    assert!(done
        .model_answer
        .as_deref()
        .is_some_and(|m| m.contains("moon")));
    let cited: Vec<&str> = done.citations.iter().map(|c| c.snippet.as_str()).collect();
    assert!(
        done.citations.iter().all(|c| c.document_id == "long") && !cited.is_empty(),
        "{cited:?}"
    );
    assert!(!done.cached);
}

#[tokio::test]
async fn a_kept_summary_is_replayed_without_the_model_until_the_document_changes() {
    let s = setup(
        Script::Answer(vec!["Cats sleep sixteen hours a day [1]."]),
        &[],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(long_cats()).await.unwrap();
    let req = json!({ "document_id": "long" });
    let first = summary_events(&s.pipeline, req.clone()).await.unwrap();
    // The summary is kept by a task of its own.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let second = summary_events(&s.pipeline, req.clone()).await.unwrap();
    assert_eq!(
        s.generator.prompts().len(),
        1,
        "the second was not generated"
    );
    let (a, b) = (done(&first), done(&second));
    assert!(b.cached && !a.cached);
    assert_eq!(a.answer, b.answer);
    assert_eq!(b.usage.completion_tokens, 0);
    assert_eq!(streamed(&second), streamed(&first), "streamed the same");
    // Another style is another summary.
    summary_events(
        &s.pipeline,
        json!({ "document_id": "long", "style": "detailed" }),
    )
    .await
    .unwrap();
    assert_eq!(s.generator.prompts().len(), 2);
    // A changed document is summarised again.
    let mut changed = long_cats();
    changed.documents[0]
        .text
        .push_str("\n\nOne more line about cats.");
    s.pipeline.ingest(changed).await.unwrap();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let third = summary_events(&s.pipeline, req).await.unwrap();
    assert!(!done(&third).cached);
    assert_eq!(s.generator.prompts().len(), 3);
}

#[tokio::test]
async fn a_long_text_is_summarised_section_by_section_then_joined_and_checked_against_its_passages()
{
    let mut config = config(&[]);
    config.chunking.max_tokens = 200;
    let s = setup_with(
        config,
        Script::Answer(vec!["Cats sleep sixteen hours a day and wake at dusk [2]."]),
        Arc::new(NoRerank),
    );
    // Some 3,600 words: three sections of at most 1,536.
    let text = (0..18)
        .map(|i| {
            format!(
                "Part {i}. {}",
                "Cats sleep sixteen hours a day and wake at dusk to hunt mice. ".repeat(16)
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    s.pipeline
        .ingest(
            serde_json::from_value(json!({ "documents": [{ "id": "big", "text": text }] }))
                .unwrap(),
        )
        .await
        .unwrap();
    let events = summary_events(&s.pipeline, json!({ "document_id": "big" }))
        .await
        .unwrap();
    let prompts = s.generator.prompts();
    assert!(
        prompts.len() >= 3,
        "sections, then the join: {}",
        prompts.len()
    );
    let (sections, join) = prompts.split_at(prompts.len() - 1);
    // Each section's passages keep their numbers in the document.
    let mut next = 1;
    for p in sections {
        assert!(p.close.contains("summarize what the passages say"));
        for passage in &p.passages {
            assert!(
                passage.heading.starts_with(&format!("[{next}]")),
                "{}",
                passage.heading
            );
            next += 1;
        }
    }
    let join = &join[0];
    assert!(join.close.contains("summaries of the consecutive parts"));
    assert!(join.passages.iter().all(|p| !p.heading.contains("Part")));
    assert_eq!(join.passages.len(), sections.len());
    assert!(
        join.passages.iter().all(|p| !p.text.contains("[2]")),
        "the sections' markers are taken out"
    );
    let done = done(&events);
    // Checked against every passage of the document, not the sections.
    assert_eq!(done.sources.len(), next - 1);
    assert_eq!(done.answer_kind, crate::AnswerKind::Generated);
    assert!(done.citations.iter().all(|c| c.document_id == "big"));
    assert!(!done.citations.is_empty());
}

#[tokio::test]
async fn a_filter_or_a_query_picks_what_is_summarised() {
    let s = setup(
        Script::Answer(vec!["Owls hunt at night by sound alone [1]."]),
        &[],
        Arc::new(NoRerank),
    );
    s.pipeline.ingest(long_cats()).await.unwrap();
    let events = summary_events(
        &s.pipeline,
        json!({ "filter": { "metadata.kind": "birds" } }),
    )
    .await
    .unwrap();
    let done_filter = done(&events);
    assert!(done_filter.sources.iter().all(|s| s.document_id == "other"));
    assert_eq!(done_filter.citations[0].document_id, "other");
    let events = summary_events(&s.pipeline, json!({ "query": "owls hunting at night" }))
        .await
        .unwrap();
    let done_query = done(&events);
    assert_eq!(done_query.sources[0].document_id, "other");
    // Nothing picked: declined without the model.
    let before = s.generator.prompts().len();
    let events = summary_events(
        &s.pipeline,
        json!({ "filter": { "metadata.kind": "fish" } }),
    )
    .await
    .unwrap();
    assert_eq!(done(&events).answer_kind, crate::AnswerKind::Declined);
    assert_eq!(s.generator.prompts().len(), before);
}

#[tokio::test]
async fn bad_summary_requests_are_refused_before_anything_runs() {
    let s = setup(Script::Answer(vec!["x"]), &[], Arc::new(NoRerank));
    s.pipeline.ingest(long_cats()).await.unwrap();
    for req in [
        json!({}),
        json!({ "document_id": "long", "query": "cats" }),
        json!({ "document_id": "long", "style": "long" }),
        json!({ "document_id": "long", "max_tokens": 0 }),
        json!({ "document_id": "long", "max_tokens": 100000 }),
        json!({ "query": "   " }),
        json!({ "query": "cats", "top_k": 0 }),
        json!({ "document_id": "long", "top_k": 0 }),
        json!({ "filter": { "title": "x" } }),
    ] {
        let e = summary_events(&s.pipeline, req.clone()).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{req}: {e:?}");
    }
    for id in ["missing", "long\u{0}", "\u{1}"] {
        let e = summary_events(&s.pipeline, json!({ "document_id": id }))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{id:?}: {e:?}");
        let e = s.pipeline.get_document(id).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{id:?}: {e:?}");
        let e = s.pipeline.delete_document(id).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{id:?}: {e:?}");
    }
    assert!(s.generator.prompts().is_empty());
}
