//! Ingest and ask stage: which embedder reads a text.
//!
//! No embedding model at hand serves English and Chinese equally well:
//! all-MiniLM-L6-v2 finds English passages best but gives Chinese text vectors
//! that carry no meaning; multilingual-e5-small reads Chinese (and ~100 other
//! languages, also across languages) but finds English passages less well. So
//! ragd can run two side by side, a `primary` and a `multilingual` embedder:
//!
//! * every passage is stored as **one** vector, the two models' halves side
//!   by side, each scaled by 1/√2 (one HNSW graph, one store, one identity):
//!   an English passage is embedded by both (a unit vector), a passage in
//!   another language by the multilingual model only, the primary half left
//!   zero — the English model's vector of a Chinese text is noise that would
//!   rank it for English queries at random;
//! * a query is embedded by the model its language calls for into a vector
//!   whose other half is zero and whose own half is scaled by √2: its dot
//!   product with a stored passage is then exactly that model's cosine, so
//!   each model's calibrated thresholds keep their meaning;
//! * an English query is searched by both halves (two rankings to fuse with
//!   the lexical one); a query in any other language by the multilingual half
//!   only. Where no configured model reads the query's language (an
//!   English-only embedder alone, a Chinese question), [`RoutedEmbedder::query`]
//!   returns no dense search at all and retrieval is lexical.
//!
//! With one embedder, vectors pass through unchanged.

use std::sync::Arc;

use ragd_core::{async_trait, BackendError, Embed, EmbedderInfo, TextKind};
use serde::Serialize;

use crate::language::{self, Lang};

/// Which model's half of the stored vector a query is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// `models.embedder`.
    Primary,
    /// `models.multilingual_embedder`.
    Multilingual,
}

/// A query vector for one dense search, full width (the other half zero).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryVector {
    /// The model that embedded it.
    pub side: Side,
    /// Its dot product with a stored vector is that model's cosine.
    pub vector: Vec<f32>,
    /// The part of stored vectors that model wrote (all zero in a passage it
    /// does not read).
    pub half: std::ops::Range<usize>,
}

/// One or two embedders behind one [`Embed`]; see the module documentation.
#[derive(Debug)]
pub struct RoutedEmbedder {
    primary: Arc<dyn Embed>,
    multilingual: Option<Arc<dyn Embed>>,
    info: EmbedderInfo,
}

impl RoutedEmbedder {
    /// Routes between `primary` and, when given, `multilingual`.
    pub fn new(primary: Arc<dyn Embed>, multilingual: Option<Arc<dyn Embed>>) -> Self {
        let info = match &multilingual {
            None => primary.info().clone(),
            Some(m) => {
                let (p, m_info) = (primary.info(), m.info());
                // Each model must read a whole chunk after its own prefix.
                let room = |e: &Arc<dyn Embed>| {
                    let i = e.info();
                    let prefix = if i.passage_prefix.is_empty() {
                        0
                    } else {
                        e.count_tokens(&i.passage_prefix)
                    };
                    i.max_length.saturating_sub(prefix)
                };
                EmbedderInfo {
                    name: format!("{} + {}", p.identity(), m_info.identity()),
                    dim: p.dim + m_info.dim,
                    max_length: room(&primary).min(room(m)),
                    query_prefix: String::new(),
                    passage_prefix: String::new(),
                    multilingual: true,
                }
            }
        };
        Self {
            primary,
            multilingual,
            info,
        }
    }

    /// The model on `side` (the primary when there is no multilingual one).
    pub fn model(&self, side: Side) -> &EmbedderInfo {
        match (side, &self.multilingual) {
            (Side::Multilingual, Some(m)) => m.info(),
            _ => self.primary.info(),
        }
    }

    /// The part of stored vectors `side`'s model writes.
    pub fn half(&self, side: Side) -> std::ops::Range<usize> {
        let p = self.primary.info().dim;
        match (&self.multilingual, side) {
            (Some(m), Side::Multilingual) => p..p + m.info().dim,
            _ => 0..p,
        }
    }

    /// Whether a second, multilingual model is configured.
    pub fn is_paired(&self) -> bool {
        self.multilingual.is_some()
    }

    /// The sides that read `lang`, best first: an English text is read by
    /// the primary model and then the multilingual one; another language by
    /// the multilingual model, or by the primary one if it is multilingual
    /// itself; none when no model reads it.
    pub fn sides(&self, lang: Lang) -> Vec<Side> {
        match (&self.multilingual, lang) {
            (Some(_), Lang::En) => vec![Side::Primary, Side::Multilingual],
            (Some(_), _) => vec![Side::Multilingual],
            (None, Lang::En) => vec![Side::Primary],
            (None, _) if self.primary.info().multilingual => vec![Side::Primary],
            (None, _) => Vec::new(),
        }
    }

    /// The side whose cosine scores passages for a text in `lang` (min_score,
    /// abstention, the answer check): the first of [`RoutedEmbedder::sides`],
    /// or the primary model when none reads it.
    pub fn scoring_side(&self, lang: Lang) -> Side {
        self.sides(lang).first().copied().unwrap_or(Side::Primary)
    }

    /// The dense searches for a query in `lang`: one vector per side that
    /// reads the language, best first (none: search lexically).
    pub async fn query(&self, text: &str, lang: Lang) -> Result<Vec<QueryVector>, BackendError> {
        // Each model runs on its own thread: embed with both at once.
        let searches = self.sides(lang).into_iter().map(|side| async move {
            let v = self
                .embed_side(side, TextKind::Query, vec![text.to_string()])
                .await?;
            let vector = v
                .into_iter()
                .next()
                .ok_or_else(|| BackendError::server("the embedder returned no vector"))?;
            Ok::<_, BackendError>(QueryVector {
                side,
                half: self.half(side),
                vector,
            })
        });
        futures::future::try_join_all(searches).await
    }

    /// `texts` embedded by one side's model as `kind`, as full-width query
    /// vectors (the other half zero, this half scaled by √2).
    async fn embed_side(
        &self,
        side: Side,
        kind: TextKind,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        self.embed_scaled(side, kind, texts, std::f32::consts::SQRT_2)
            .await
    }

    /// `texts` embedded as passages by one side's model only, as full-width
    /// vectors (the other half zero, this half scaled by 1/√2 as stored):
    /// their dot product with a query vector of that side is the model's
    /// cosine. Cheaper than [`Embed::embed`] when only one side's score is
    /// wanted (evidence selection).
    pub async fn embed_passages_on(
        &self,
        side: Side,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        self.embed_scaled(
            side,
            TextKind::Passage,
            texts,
            std::f32::consts::FRAC_1_SQRT_2,
        )
        .await
    }

    async fn embed_scaled(
        &self,
        side: Side,
        kind: TextKind,
        texts: Vec<String>,
        scale: f32,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let Some(m) = &self.multilingual else {
            return self.primary.embed(kind, texts).await;
        };
        let (model, before, after) = match side {
            Side::Primary => (&self.primary, 0, m.info().dim),
            Side::Multilingual => (m, self.primary.info().dim, 0),
        };
        let vectors = model.embed(kind, texts).await?;
        Ok(vectors
            .into_iter()
            .map(|v| {
                let mut full = vec![0.0; before];
                full.extend(v.iter().map(|x| x * scale));
                full.resize(before + v.len() + after, 0.0);
                full
            })
            .collect())
    }
}

#[async_trait]
impl Embed for RoutedEmbedder {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    /// The count of the models that read `text`: for English the larger of
    /// the two (a chunk must fit both windows), for another language the
    /// multilingual model's (the English one does not embed it; its
    /// tokenizer would count each Han character as a token and make Chinese
    /// chunks needlessly small).
    fn count_tokens(&self, text: &str) -> usize {
        match &self.multilingual {
            Some(m) if self.scoring_side(language::detect(text)) == Side::Multilingual => {
                m.count_tokens(text)
            }
            Some(m) => self.primary.count_tokens(text).max(m.count_tokens(text)),
            None => self.primary.count_tokens(text),
        }
    }

    /// Passages: both models, side by side, each half scaled by 1/√2.
    /// Queries: each text by the model that scores its language
    /// ([`RoutedEmbedder::scoring_side`]), as a full-width query vector.
    async fn embed(
        &self,
        kind: TextKind,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let Some(m) = &self.multilingual else {
            return self.primary.embed(kind, texts).await;
        };
        match kind {
            TextKind::Passage => {
                // The primary model reads only the English passages; the
                // others get zeros there (no noise for English queries).
                let english: Vec<bool> = texts
                    .iter()
                    .map(|t| self.scoring_side(language::detect(t)) == Side::Primary)
                    .collect();
                let for_primary: Vec<String> = texts
                    .iter()
                    .zip(&english)
                    .filter(|(_, &e)| e)
                    .map(|(t, _)| t.clone())
                    .collect();
                let (p, q) = tokio::join!(
                    async {
                        if for_primary.is_empty() {
                            Ok(Vec::new())
                        } else {
                            self.primary.embed(kind, for_primary).await
                        }
                    },
                    m.embed(kind, texts)
                );
                let half = std::f32::consts::FRAC_1_SQRT_2;
                let zeros = vec![0.0; self.primary.info().dim];
                let mut p = p?.into_iter();
                let mut out = Vec::with_capacity(english.len());
                for (b, e) in q?.into_iter().zip(english) {
                    let a = if e {
                        p.next().ok_or_else(|| {
                            BackendError::server("the embedder returned too few vectors")
                        })?
                    } else {
                        zeros.clone()
                    };
                    out.push(a.iter().chain(&b).map(|x| x * half).collect());
                }
                Ok(out)
            }
            TextKind::Query => {
                let mut out = vec![Vec::new(); texts.len()];
                for side in [Side::Primary, Side::Multilingual] {
                    let (idx, batch): (Vec<usize>, Vec<String>) = texts
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| self.scoring_side(language::detect(t)) == side)
                        .map(|(i, t)| (i, t.clone()))
                        .unzip();
                    if batch.is_empty() {
                        continue;
                    }
                    for (i, v) in idx
                        .into_iter()
                        .zip(self.embed_side(side, kind, batch).await?)
                    {
                        out[i] = v;
                    }
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose vector of a text is fixed by a function.
    #[derive(Debug)]
    struct Fake {
        info: EmbedderInfo,
        vector: fn(&str) -> Vec<f32>,
        /// Tokens per character, to tell the two counts apart.
        tokens_per_char: usize,
    }

    fn fake(
        name: &str,
        multilingual: bool,
        vector: fn(&str) -> Vec<f32>,
        tpc: usize,
    ) -> Arc<dyn Embed> {
        Arc::new(Fake {
            info: EmbedderInfo {
                name: name.into(),
                dim: vector("").len(),
                max_length: if multilingual { 512 } else { 256 },
                query_prefix: String::new(),
                passage_prefix: if multilingual {
                    "passage: ".into()
                } else {
                    String::new()
                },
                multilingual,
            },
            vector,
            tokens_per_char: tpc,
        })
    }

    #[async_trait]
    impl Embed for Fake {
        fn info(&self) -> &EmbedderInfo {
            &self.info
        }
        fn count_tokens(&self, text: &str) -> usize {
            text.chars().count() * self.tokens_per_char
        }
        async fn embed(
            &self,
            _: TextKind,
            texts: Vec<String>,
        ) -> Result<Vec<Vec<f32>>, BackendError> {
            Ok(texts.iter().map(|t| (self.vector)(t)).collect())
        }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// English-only: cats along one axis, anything else along the other.
    fn english(t: &str) -> Vec<f32> {
        if t.contains("cat") {
            vec![1.0, 0.0]
        } else {
            unit(&[1.0, 1.0])
        }
    }

    /// Multilingual: cats (猫 too) along one axis.
    fn multilingual(t: &str) -> Vec<f32> {
        if t.contains("cat") || t.contains('猫') {
            vec![0.0, 1.0, 0.0]
        } else {
            unit(&[0.0, 1.0, 1.0])
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn paired() -> RoutedEmbedder {
        RoutedEmbedder::new(
            fake("en", false, english, 2),
            Some(fake("multi", true, multilingual, 1)),
        )
    }

    #[tokio::test]
    async fn a_query_scores_each_passage_by_its_own_models_cosine() {
        let r = paired();
        assert_eq!(r.info().dim, 5);
        assert!(r.info().name.contains("en + multi"), "{}", r.info().name);
        // Both windows must hold a chunk: 256 for one, 512 less its prefix.
        assert_eq!(r.info().max_length, 256);
        assert_eq!(
            r.count_tokens("The cat sat."),
            24,
            "English: the larger count"
        );
        assert_eq!(
            r.count_tokens("猫在睡觉。"),
            5,
            "Chinese: the multilingual model's"
        );

        let passages = r
            .embed(
                TextKind::Passage,
                vec!["The cat sleeps all day long.".into(), "Dogs bark.".into()],
            )
            .await
            .unwrap();
        for p in &passages {
            assert!(
                (dot(p, p) - 1.0).abs() < 1e-5,
                "English passages are unit vectors"
            );
        }
        // A Chinese passage is read by the multilingual model alone.
        let zh_passage = r
            .embed(TextKind::Passage, vec!["猫每天睡十六个小时。".into()])
            .await
            .unwrap();
        assert_eq!(&zh_passage[0][..2], &[0.0, 0.0]);
        let en = r
            .query("Why does the cat sleep so much?", Lang::En)
            .await
            .unwrap();
        assert_eq!(
            en.iter().map(|q| q.side).collect::<Vec<_>>(),
            [Side::Primary, Side::Multilingual]
        );
        // Each search sees exactly its model's cosine.
        assert!((dot(&en[0].vector, &passages[0]) - 1.0).abs() < 1e-5);
        assert!((dot(&en[0].vector, &passages[1]) - unit(&[1.0, 1.0])[0]).abs() < 1e-5);
        assert!((dot(&en[1].vector, &passages[0]) - 1.0).abs() < 1e-5);

        let zh = r.query("猫为什么睡这么多？", Lang::Zh).await.unwrap();
        assert_eq!(zh.len(), 1);
        assert_eq!(zh[0].side, Side::Multilingual);
        assert!((dot(&zh[0].vector, &passages[0]) - 1.0).abs() < 1e-5);
        assert!((dot(&zh[0].vector, &zh_passage[0]) - 1.0).abs() < 1e-5);
        assert_eq!(
            &zh[0].vector[..2],
            &[0.0, 0.0],
            "the English half is not used"
        );

        // The answer check embeds each sentence by its own language's model.
        let q = r
            .embed(
                TextKind::Query,
                vec!["The cat is asleep.".into(), "猫在睡觉。".into()],
            )
            .await
            .unwrap();
        assert_eq!(&q[0][2..], &[0.0, 0.0, 0.0]);
        assert_eq!(&q[1][..2], &[0.0, 0.0]);
    }

    #[tokio::test]
    async fn without_a_model_for_the_language_there_is_no_dense_search() {
        let alone = RoutedEmbedder::new(fake("en", false, english, 1), None);
        assert!(alone
            .query("猫为什么睡这么多？", Lang::Zh)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(alone.query("cats?", Lang::En).await.unwrap().len(), 1);
        // One model passes through unchanged.
        assert_eq!(alone.info().name, "en");
        let v = alone
            .embed(TextKind::Passage, vec!["cat".into()])
            .await
            .unwrap();
        assert_eq!(v[0], vec![1.0, 0.0]);

        let multi = RoutedEmbedder::new(fake("multi", true, multilingual, 1), None);
        let zh = multi.query("猫为什么睡这么多？", Lang::Zh).await.unwrap();
        assert_eq!(
            zh.iter().map(|q| q.side).collect::<Vec<_>>(),
            [Side::Primary]
        );
    }
}
