//! The approximate nearest-neighbour index over chunk embeddings.
//!
//! ragd's embedders produce L2-normalised vectors, so cosine similarity is a dot
//! product and an HNSW graph over "1 − dot" finds the nearest chunks. The graph is
//! [hnsw_rs]; this crate wraps it for three reasons:
//!
//! * hnsw_rs reacts to bad parameters by calling `process::exit` (for example
//!   `max_nb_connection > 256`) or by silently clamping them. [`IndexConfig::validate`]
//!   turns every such case into an [`IndexError`] before hnsw_rs sees it.
//! * hnsw_rs' own `DistDot` asserts `dot <= 1`, which rounding breaks for a vector
//!   compared with itself (dot = 1.0000001 panics the process). [`ClampedDot`] is
//!   the same distance, clamped to `[0, 2]`.
//! * Callers want similarity scores (higher is better) and ids of their own, and
//!   they want dimension mismatches and non-finite vectors refused, not indexed.
//!
//! Ids are `usize` chunk keys chosen by the caller. Deleting is the caller's
//! concern for now: search takes a filter so that replaced chunks are skipped.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hnsw_rs::hnsw::Point;
use hnsw_rs::prelude::{AnnT, Distance, FilterT, Hnsw, HnswIo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const DUMP_BASENAME: &str = "ragd";
const DUMP_META: &str = "ragd-index.json";

/// What a dump covers, written beside hnsw_rs' files.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct DumpMeta {
    /// The store generation the graph reflects.
    generation: u64,
    dim: usize,
    points: usize,
    /// sha256 of `ragd.hnsw.graph` and `ragd.hnsw.data`: hnsw_rs does not check
    /// what it reads, so damage is caught here before it loads anything.
    graph_sha256: String,
    data_sha256: String,
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// hnsw_rs refuses more than this many connections per node (it exits the process).
pub const MAX_CONNECTIONS: usize = 256;
/// hnsw_rs keeps at most 16 layers and silently clamps larger values.
pub const MAX_LAYERS: usize = 16;

/// Parameters of the HNSW graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Neighbours kept per node and layer (the "M" of the HNSW paper), 2..=256.
    pub max_connections: usize,
    /// Candidate list size while building; larger is slower and more exact.
    pub ef_construction: usize,
    /// Candidate list size while searching; at least the number of hits asked for.
    pub ef_search: usize,
    /// Number of graph layers, 1..=16.
    pub max_layers: usize,
    /// Expected number of vectors: a sizing hint, not a limit.
    pub capacity_hint: usize,
    /// Rebuild the graph when more than this fraction of its nodes are
    /// tombstones (chunks of replaced or deleted documents), in (0, 1].
    pub compact_fraction: f32,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            ef_construction: 200,
            ef_search: 64,
            max_layers: 16,
            capacity_hint: 100_000,
            compact_fraction: 0.25,
        }
    }
}

impl IndexConfig {
    /// Checks every parameter that hnsw_rs would otherwise exit, panic or clamp on.
    pub fn validate(&self) -> Result<(), IndexError> {
        let bad =
            |field: &'static str, reason: String| Err(IndexError::InvalidConfig { field, reason });
        if !(2..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return bad(
                "max_connections",
                format!("{} is outside 2..={MAX_CONNECTIONS}", self.max_connections),
            );
        }
        if self.ef_construction == 0 {
            return bad("ef_construction", "must be at least 1".into());
        }
        if self.ef_search == 0 {
            return bad("ef_search", "must be at least 1".into());
        }
        if !(1..=MAX_LAYERS).contains(&self.max_layers) {
            return bad(
                "max_layers",
                format!("{} is outside 1..={MAX_LAYERS}", self.max_layers),
            );
        }
        if self.capacity_hint == 0 {
            return bad("capacity_hint", "must be at least 1".into());
        }
        if !(self.compact_fraction > 0.0 && self.compact_fraction <= 1.0) {
            return bad(
                "compact_fraction",
                format!("{} is outside (0, 1]", self.compact_fraction),
            );
        }
        Ok(())
    }
}

/// What went wrong in the index.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexError {
    /// A configuration value is out of range (operator's fault).
    #[error("invalid index setting {field}: {reason}")]
    InvalidConfig {
        /// The offending key.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A vector of the wrong length was given (caller's fault).
    #[error("vector has {got} dimensions, the index holds {expected}")]
    DimensionMismatch {
        /// The index's dimension.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// A vector contains NaN or infinity (caller's fault).
    #[error("vector contains a non-finite value")]
    NonFinite,
    /// A dump cannot be used (missing, stale, damaged): the graph is rebuilt
    /// from the store instead.
    #[error("{0}")]
    DumpUnusable(String),
    /// Writing a dump failed (the disk's fault).
    #[error("index dump {path}: {message}")]
    Dump {
        /// The dump directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// Cosine distance for unit vectors, `1 − a·b`, clamped to `[0, 2]` so that
/// rounding never produces a negative distance.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClampedDot;

impl Distance<f32> for ClampedDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        (1.0 - dot).clamp(0.0, 2.0)
    }
}

pub use ragd_core::Hit;

/// An HNSW index of unit vectors of one dimension.
///
/// Insertion and search take `&self`: hnsw_rs locks internally, so one index can
/// be shared between the ingest path and concurrent searches.
pub struct VectorIndex {
    hnsw: Hnsw<'static, f32, ClampedDot>,
    dim: usize,
    config: IndexConfig,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dim", &self.dim)
            .field("len", &self.len())
            .finish()
    }
}

impl VectorIndex {
    /// An empty index for vectors of `dim` dimensions.
    pub fn new(dim: usize, config: IndexConfig) -> Result<Self, IndexError> {
        config.validate()?;
        if dim == 0 {
            return Err(IndexError::InvalidConfig {
                field: "dim",
                reason: "must be at least 1".into(),
            });
        }
        let hnsw = Hnsw::new(
            config.max_connections,
            config.capacity_hint,
            config.max_layers,
            config.ef_construction,
            ClampedDot,
        );
        Ok(Self { hnsw, dim, config })
    }

    /// Writes the graph to `dir` (replacing what is there) as covering store
    /// generation `generation`. The files go to a temporary directory first, which
    /// is then renamed, so `dir` holds a complete dump or none.
    pub fn dump(&self, dir: &Path, generation: u64) -> Result<(), IndexError> {
        let fail = |message: String| IndexError::Dump {
            path: dir.to_owned(),
            message,
        };
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| fail(e.to_string()))?;
        let written = self
            .hnsw
            .file_dump(&tmp, DUMP_BASENAME)
            .map_err(|e| fail(e.to_string()))?;
        if written != DUMP_BASENAME {
            return Err(fail(format!("hnsw_rs wrote {written:?}")));
        }
        let graph = tmp.join(format!("{DUMP_BASENAME}.hnsw.graph"));
        let data = tmp.join(format!("{DUMP_BASENAME}.hnsw.data"));
        let meta = DumpMeta {
            generation,
            dim: self.dim,
            points: self.len(),
            graph_sha256: sha256_file(&graph).map_err(|e| fail(e.to_string()))?,
            data_sha256: sha256_file(&data).map_err(|e| fail(e.to_string()))?,
        };
        let json = serde_json::to_vec(&meta).map_err(|e| fail(e.to_string()))?;
        std::fs::write(tmp.join(DUMP_META), json).map_err(|e| fail(e.to_string()))?;
        for f in [&graph, &data, &tmp.join(DUMP_META)] {
            std::fs::File::open(f)
                .and_then(|f| f.sync_all())
                .map_err(|e| fail(e.to_string()))?;
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// Loads the dump in `dir` if it covers store generation `generation` with
    /// vectors of `dim` dimensions and is intact; otherwise says why not, and the
    /// caller rebuilds from the store.
    pub fn load_dump(
        dir: &Path,
        config: IndexConfig,
        generation: u64,
        dim: usize,
    ) -> Result<Self, IndexError> {
        let unusable = IndexError::DumpUnusable;
        config.validate()?;
        let meta: DumpMeta = std::fs::read(dir.join(DUMP_META))
            .map_err(|e| unusable(format!("no dump ({e})")))
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| unusable(format!("unreadable dump metadata ({e})")))
            })?;
        if meta.generation != generation {
            return Err(unusable(format!(
                "dump covers generation {}, the store is at {generation}",
                meta.generation
            )));
        }
        if meta.dim != dim {
            return Err(unusable(format!(
                "dump holds {}-dimensional vectors, not {dim}",
                meta.dim
            )));
        }
        let graph = dir.join(format!("{DUMP_BASENAME}.hnsw.graph"));
        let data = dir.join(format!("{DUMP_BASENAME}.hnsw.data"));
        for (file, want) in [(&graph, &meta.graph_sha256), (&data, &meta.data_sha256)] {
            let got =
                sha256_file(file).map_err(|e| unusable(format!("{}: {e}", file.display())))?;
            if &got != want {
                return Err(unusable(format!(
                    "{} is damaged (checksum mismatch)",
                    file.display()
                )));
            }
        }
        // hnsw_rs' loaded graph borrows its `HnswIo` for its whole life. The loader
        // is leaked (a few hundred bytes, once per start) so the graph can be owned
        // with a 'static lifetime, without unsafe code.
        let io: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir, DUMP_BASENAME)));
        let hnsw: Hnsw<'static, f32, ClampedDot> = io
            .load_hnsw()
            .map_err(|e| unusable(format!("hnsw_rs: {e}")))?;
        if hnsw.get_nb_point() != meta.points {
            return Err(unusable(format!(
                "dump has {} points, its metadata says {}",
                hnsw.get_nb_point(),
                meta.points
            )));
        }
        Ok(Self { hnsw, dim, config })
    }

    /// The dimension of the vectors held.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of vectors inserted.
    pub fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }

    /// Whether nothing has been inserted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, v: &[f32]) -> Result<(), IndexError> {
        if v.len() != self.dim {
            return Err(IndexError::DimensionMismatch {
                expected: self.dim,
                got: v.len(),
            });
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(IndexError::NonFinite);
        }
        Ok(())
    }

    /// Checks every vector of a batch without inserting anything, so that a caller
    /// can refuse a whole batch before changing the index.
    pub fn check_all<'a>(
        &self,
        vectors: impl IntoIterator<Item = &'a [f32]>,
    ) -> Result<(), IndexError> {
        vectors.into_iter().try_for_each(|v| self.check(v))
    }

    /// Inserts one unit vector under `id`.
    pub fn insert(&self, id: usize, vector: &[f32]) -> Result<(), IndexError> {
        self.check(vector)?;
        self.hnsw.insert_slice((vector, id));
        Ok(())
    }

    /// Inserts many vectors on all cores (hnsw_rs inserts concurrently); all are
    /// checked before any is inserted.
    pub fn insert_many(&self, items: &[(usize, &[f32])]) -> Result<(), IndexError> {
        items.iter().try_for_each(|(_, v)| self.check(v))?;
        let items: Vec<(&[f32], usize)> = items.iter().map(|&(id, v)| (v, id)).collect();
        self.hnsw.parallel_insert_slice(&items);
        Ok(())
    }

    /// The `k` nearest vectors to `query` for which `keep(id)` holds, best first.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        self.search_with_ef(query, k, self.config.ef_search, keep)
    }

    /// [`VectorIndex::search`] with a given candidate list size (at least `k`).
    pub fn search_with_ef(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        self.check(query)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let ef = ef.max(k);
        let filter = |id: &usize| keep(*id);
        let found = self
            .hnsw
            .search_filter(query, k, ef, Some(&filter as &dyn FilterT));
        let mut hits: Vec<Hit> = found
            .into_iter()
            .map(|n| Hit {
                id: n.d_id,
                score: 1.0 - n.distance,
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        hits.truncate(k);
        Ok(hits)
    }

    /// Every point of the graph — removed ones too, until the graph is
    /// rebuilt: the caller knows which are live.
    fn points(&self) -> impl Iterator<Item = Arc<Point<'static, f32>>> + '_ {
        // hnsw_rs' point iterator unwraps the entry point once past the
        // first layer, which an empty graph does not have.
        (!self.is_empty())
            .then(|| self.hnsw.get_point_indexation().into_iter())
            .into_iter()
            .flatten()
    }

    /// Calls `f` with each vector the graph holds and its id (removed ones
    /// too, as [`Self::points`]). The graph is where a service keeps its
    /// vectors in memory (one copy, not another beside it in the store).
    pub fn for_each_vector(&self, mut f: impl FnMut(usize, &[f32])) {
        for point in self.points() {
            f(point.get_origin_id(), point.get_v());
        }
    }

    /// [`exact_top_k`] over the vectors of this graph for which `keep(id)`
    /// holds: the `k` most similar to `query` by comparing it with each, for
    /// sets small or filtered enough that the graph's search could miss some.
    pub fn exact_search(
        &self,
        query: &[f32],
        k: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Hit>, IndexError> {
        self.check(query)?;
        let kept: Vec<_> = self.points().filter(|p| keep(p.get_origin_id())).collect();
        exact_top_k(
            query,
            kept.iter().map(|p| (p.get_origin_id(), p.get_v())),
            k,
        )
    }
}

/// Exact search: the `k` candidates most similar to `query` (dot product of
/// unit vectors), best first. For small or heavily filtered sets, where the
/// graph could return fewer than `k` hits.
pub fn exact_top_k<'a>(
    query: &[f32],
    candidates: impl Iterator<Item = (usize, &'a [f32])>,
    k: usize,
) -> Result<Vec<Hit>, IndexError> {
    let mut hits = Vec::new();
    for (id, v) in candidates {
        if v.len() != query.len() {
            return Err(IndexError::DimensionMismatch {
                expected: query.len(),
                got: v.len(),
            });
        }
        hits.push(Hit {
            id,
            score: v.iter().zip(query).map(|(a, b)| a * b).sum(),
        });
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    hits.truncate(k);
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn unit(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn random_unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
        unit((0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
    }

    #[test]
    fn refuses_parameters_hnsw_rs_would_exit_on() {
        let cfg = IndexConfig {
            max_connections: 257,
            ..Default::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(IndexError::InvalidConfig {
                field: "max_connections",
                ..
            })
        ));
        assert!(VectorIndex::new(8, cfg).is_err());
        let cfg = IndexConfig {
            max_layers: 17,
            ..Default::default()
        };
        assert!(VectorIndex::new(8, cfg).is_err());
        let cfg = IndexConfig {
            ef_search: 0,
            ..Default::default()
        };
        assert!(VectorIndex::new(8, cfg).is_err());
        assert!(VectorIndex::new(0, IndexConfig::default()).is_err());
        assert!(IndexConfig {
            max_connections: 256,
            ..Default::default()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn finds_exact_match_first_with_score_one() {
        let mut rng = StdRng::seed_from_u64(7);
        let index = VectorIndex::new(32, IndexConfig::default()).unwrap();
        let vectors: Vec<Vec<f32>> = (0..500).map(|_| random_unit(&mut rng, 32)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(i, v).unwrap();
        }
        assert_eq!(index.len(), 500);
        for probe in [0usize, 17, 499] {
            let hits = index.search(&vectors[probe], 5, &|_| true).unwrap();
            assert_eq!(hits.len(), 5);
            assert_eq!(hits[0].id, probe);
            assert!(
                (hits[0].score - 1.0).abs() < 1e-5,
                "score {}",
                hits[0].score
            );
            assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        }
    }

    #[test]
    fn recall_against_brute_force() {
        let mut rng = StdRng::seed_from_u64(11);
        let dim = 48;
        let index = VectorIndex::new(dim, IndexConfig::default()).unwrap();
        let vectors: Vec<Vec<f32>> = (0..2000).map(|_| random_unit(&mut rng, dim)).collect();
        let items: Vec<(usize, &[f32])> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (i, v.as_slice()))
            .collect();
        index.insert_many(&items).unwrap();
        assert_eq!(index.len(), 2000);
        let mut found = 0;
        let queries = 50;
        for _ in 0..queries {
            let q = random_unit(&mut rng, dim);
            let mut exact: Vec<(usize, f32)> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (i, v.iter().zip(&q).map(|(a, b)| a * b).sum()))
                .collect();
            exact.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<usize> = exact[..10].iter().map(|e| e.0).collect();
            let hits = index.search(&q, 10, &|_| true).unwrap();
            found += hits.iter().filter(|h| top.contains(&h.id)).count();
        }
        let recall = found as f64 / (queries * 10) as f64;
        assert!(recall >= 0.9, "recall@10 = {recall}");
    }

    #[test]
    fn exact_search_ranks_by_dot_product() {
        let a = unit(vec![1.0, 0.0]);
        let b = unit(vec![0.6, 0.8]);
        let c = unit(vec![0.0, 1.0]);
        let hits = exact_top_k(
            &[1.0, 0.0],
            [(7, &a[..]), (8, &b[..]), (9, &c[..])].into_iter(),
            2,
        )
        .unwrap();
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), vec![7, 8]);
        assert!((hits[1].score - 0.6).abs() < 1e-6);
    }

    /// Exact search over the graph's own vectors: every vector of every
    /// layer is seen once, the filter applies, and it agrees with
    /// [`exact_top_k`] over the same vectors — in a built graph, in one
    /// loaded from a dump, and in an empty one.
    #[test]
    fn exact_search_over_the_graph_sees_every_vector_once() {
        let mut rng = StdRng::seed_from_u64(5);
        let index = VectorIndex::new(8, IndexConfig::default()).unwrap();
        let empty = index.exact_search(&random_unit(&mut rng, 8), 5, &|_| true);
        assert!(empty.unwrap().is_empty());
        let mut seen = 0;
        index.for_each_vector(|_, _| seen += 1);
        assert_eq!(seen, 0);
        // Enough points for several layers.
        let vectors: Vec<Vec<f32>> = (0..2000).map(|_| random_unit(&mut rng, 8)).collect();
        let items: Vec<(usize, &[f32])> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v.as_slice()))
            .collect();
        index.insert_many(&items).unwrap();
        let mut ids = Vec::new();
        index.for_each_vector(|id, v| {
            assert_eq!(v, vectors[id - 1].as_slice());
            ids.push(id);
        });
        ids.sort_unstable();
        assert_eq!(ids, (1..=2000).collect::<Vec<_>>());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("index");
        index.dump(&dir, 1).unwrap();
        let loaded = VectorIndex::load_dump(&dir, IndexConfig::default(), 1, 8).unwrap();
        let odd = |id: usize| id % 2 == 1;
        for q in (0..5).map(|_| random_unit(&mut rng, 8)) {
            let want = exact_top_k(&q, items.iter().copied().filter(|(id, _)| odd(*id)), 10);
            let want = want.unwrap();
            assert_eq!(index.exact_search(&q, 10, &odd).unwrap(), want);
            assert_eq!(loaded.exact_search(&q, 10, &odd).unwrap(), want);
        }
        assert_eq!(
            index.exact_search(&[1.0, 0.0], 3, &|_| true),
            Err(IndexError::DimensionMismatch {
                expected: 8,
                got: 2
            })
        );
    }

    #[test]
    fn dump_round_trips_and_damage_or_staleness_is_refused() {
        let mut rng = StdRng::seed_from_u64(3);
        let index = VectorIndex::new(16, IndexConfig::default()).unwrap();
        let vectors: Vec<Vec<f32>> = (0..300).map(|_| random_unit(&mut rng, 16)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(i + 10, v).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("index");
        index.dump(&dir, 7).unwrap();
        let loaded = VectorIndex::load_dump(&dir, IndexConfig::default(), 7, 16).unwrap();
        assert_eq!(loaded.len(), 300);
        for probe in [0, 150, 299] {
            assert_eq!(
                loaded.search(&vectors[probe], 3, &|_| true).unwrap(),
                index.search(&vectors[probe], 3, &|_| true).unwrap()
            );
        }
        assert!(VectorIndex::load_dump(&dir, IndexConfig::default(), 8, 16)
            .unwrap_err()
            .to_string()
            .contains("generation"));
        assert!(VectorIndex::load_dump(&dir, IndexConfig::default(), 7, 32).is_err());
        // Flip a byte of the graph: detected before hnsw_rs reads it.
        let graph = dir.join("ragd.hnsw.graph");
        let mut bytes = std::fs::read(&graph).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xFF;
        std::fs::write(&graph, bytes).unwrap();
        assert!(VectorIndex::load_dump(&dir, IndexConfig::default(), 7, 16)
            .unwrap_err()
            .to_string()
            .contains("damaged"));
        assert!(
            VectorIndex::load_dump(&tmp.path().join("none"), IndexConfig::default(), 7, 16)
                .is_err()
        );
    }

    #[test]
    fn filter_excludes_ids() {
        let index = VectorIndex::new(3, IndexConfig::default()).unwrap();
        index.insert(1, &unit(vec![1.0, 0.0, 0.0])).unwrap();
        index.insert(2, &unit(vec![0.9, 0.1, 0.0])).unwrap();
        index.insert(3, &unit(vec![0.0, 0.0, 1.0])).unwrap();
        let q = unit(vec![1.0, 0.0, 0.0]);
        let hits = index.search(&q, 3, &|id| id != 1).unwrap();
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn rejects_bad_vectors_and_handles_empty() {
        let index = VectorIndex::new(3, IndexConfig::default()).unwrap();
        assert!(index
            .search(&[1.0, 0.0, 0.0], 3, &|_| true)
            .unwrap()
            .is_empty());
        assert_eq!(
            index.insert(0, &[1.0, 0.0]),
            Err(IndexError::DimensionMismatch {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            index.insert(0, &[f32::NAN, 0.0, 0.0]),
            Err(IndexError::NonFinite)
        );
        assert!(index.is_empty());
        // A vector slightly longer than 1 (rounding) must not panic.
        index.insert(5, &[1.0000001, 0.0, 0.0]).unwrap();
        let hits = index.search(&[1.0000001, 0.0, 0.0], 1, &|_| true).unwrap();
        assert_eq!(hits[0].id, 5);
    }
}
