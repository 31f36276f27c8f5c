//! A Unigram (SentencePiece) tokenizer model that takes a few megabytes
//! instead of hundreds.
//!
//! The `tokenizers` crate's `Unigram` finds the pieces that start at a position
//! with a trie whose every node is a hash map of its children, one node per
//! byte of every piece: for multilingual-e5-small's 250,000 pieces that is
//! about 270 MB resident, the largest single thing `ragd serve` held after the
//! answer model. Here one double-array Aho–Corasick automaton (`daachorse`,
//! a few MB) finds every piece occurring in the text in one pass, and the
//! pieces themselves live in one string. The segmentation is the same as
//! `tokenizers`' (sentencepiece's "optimized" Viterbi: best total score, ties
//! to the earliest start; unknown characters scored `min_score - 10`, runs of
//! them fused into one unknown token, or bytes with `byte_fallback`), checked
//! id for id against it in this crate's tests. It plugs into `tokenizers`'
//! pipeline as its `Model`, so normalizer, pre-tokenizer, added tokens and
//! post-processor stay `tokenizers`' own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use daachorse::CharwiseDoubleArrayAhoCorasick;
use tokenizers::models::unigram::UnigramTrainer;
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::{Model, Token};

/// sentencepiece's penalty for an unknown character below the lowest score.
const UNK_PENALTY: f64 = 10.0;

/// The compact Unigram model.
pub struct CompactUnigram {
    /// All pieces, one after another; piece `i` ends at `ends[i]`.
    text: String,
    ends: Vec<u32>,
    scores: Vec<f64>,
    /// Every distinct non-empty piece → its id (for a duplicated text, the
    /// last id, as `tokenizers`' map keeps it).
    matcher: CharwiseDoubleArrayAhoCorasick<u32>,
    min_score: f64,
    unk_id: Option<u32>,
    byte_fallback: bool,
}

impl CompactUnigram {
    /// From the `(piece, score)` list, the unknown token's id and whether
    /// unknown characters fall back to `<0xNN>` byte pieces (as
    /// `tokenizers::models::unigram::Unigram::from`).
    pub fn new(
        vocab: Vec<(String, f64)>,
        unk_id: Option<usize>,
        byte_fallback: bool,
    ) -> Result<Self, String> {
        if let Some(unk) = unk_id {
            if unk >= vocab.len() {
                return Err(format!(
                    "unk_id {unk} is outside the vocabulary of {}",
                    vocab.len()
                ));
            }
        }
        let mut text = String::with_capacity(vocab.iter().map(|(p, _)| p.len()).sum());
        let mut ends = Vec::with_capacity(vocab.len());
        let mut scores = Vec::with_capacity(vocab.len());
        let mut last_id: HashMap<&str, u32> = HashMap::with_capacity(vocab.len());
        let mut min_score = f64::INFINITY;
        for (id, (piece, score)) in vocab.iter().enumerate() {
            text.push_str(piece);
            ends.push(text.len() as u32);
            scores.push(*score);
            min_score = min_score.min(*score);
            if !piece.is_empty() {
                last_id.insert(piece.as_str(), id as u32);
            }
        }
        let matcher = CharwiseDoubleArrayAhoCorasick::with_values(last_id)
            .map_err(|e| format!("cannot index the vocabulary: {e}"))?;
        Ok(Self {
            text,
            ends,
            scores,
            matcher,
            min_score,
            unk_id: unk_id.map(|u| u as u32),
            byte_fallback,
        })
    }

    fn piece(&self, id: u32) -> Option<&str> {
        let i = id as usize;
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.text[start..end])
    }

    /// The id of a whole piece.
    fn id_of(&self, piece: &str) -> Option<u32> {
        self.matcher
            .find_overlapping_iter(piece)
            .find(|m| m.start() == 0 && m.end() == piece.len())
            .map(|m| m.value())
    }

    /// The best segmentation of `sentence` as byte ranges, with each range's
    /// piece id (`None`: a run of unknowns, fused; its id is then looked up
    /// by its text, as `tokenizers` looks up every piece).
    fn segment(&self, sentence: &str) -> tokenizers::Result<Vec<(usize, usize, Option<u32>)>> {
        let size = sentence.len();
        // Every piece occurring in the sentence, by start (the automaton
        // reports them by end).
        let mut found: Vec<(u32, u32, u32)> = self
            .matcher
            .find_overlapping_iter(sentence)
            .map(|m| (m.start() as u32, m.end() as u32, m.value()))
            .collect();
        found.sort_by_key(|&(start, end, _)| (start, end));

        // best[end] = (score of the best path to `end`, where its last piece
        // starts, the piece or None for unknown); None = not reached yet.
        let mut best: Vec<Option<(f64, usize, Option<u32>)>> = vec![None; size + 1];
        best[0] = Some((0.0, 0, None));
        let unk_score = self.min_score - UNK_PENALTY;
        let mut next = 0;
        let mut starts_at = 0;
        while starts_at < size {
            let here = best[starts_at].map_or(0.0, |b| b.0);
            let char_len = sentence[starts_at..]
                .chars()
                .next()
                .map_or(1, char::len_utf8);
            while next < found.len() && (found[next].0 as usize) < starts_at {
                next += 1;
            }
            let mut single_char_piece = false;
            while next < found.len() && found[next].0 as usize == starts_at {
                let (_, end, id) = found[next];
                let end = end as usize;
                let score = here + self.scores[id as usize];
                if best[end].is_none_or(|b| score > b.0) {
                    best[end] = Some((score, starts_at, Some(id)));
                }
                single_char_piece |= end - starts_at == char_len;
                next += 1;
            }
            if !single_char_piece {
                let end = starts_at + char_len;
                let score = here + unk_score;
                if best[end].is_none_or(|b| score > b.0) {
                    if self.unk_id.is_none() {
                        return Err(format!(
                            "no piece for {:?} and no unknown token",
                            &sentence[starts_at..end]
                        )
                        .into());
                    }
                    best[end] = Some((score, starts_at, None));
                }
            }
            starts_at += char_len;
        }

        // Back from the end; adjacent unknowns fuse into one.
        let mut out: Vec<(usize, usize, Option<u32>)> = Vec::new();
        let mut end = size;
        while end > 0 {
            let Some((_, start, id)) = best[end] else {
                return Err("unreachable position in the segmentation".into());
            };
            // The unknown token's own text counts as unknown too, as in
            // `tokenizers` (it compares ids).
            let id = id.filter(|&i| Some(i) != self.unk_id);
            match (id, out.last_mut()) {
                (None, Some(last)) if last.2.is_none() => last.0 = start,
                _ => out.push((start, end, id)),
            }
            end = start;
        }
        out.reverse();
        Ok(out)
    }
}

impl Model for CompactUnigram {
    type Trainer = UnigramTrainer;

    fn tokenize(&self, sentence: &str) -> tokenizers::Result<Vec<Token>> {
        if sentence.is_empty() {
            return Ok(Vec::new());
        }
        let mut tokens = Vec::new();
        for (start, end, id) in self.segment(sentence)? {
            let text = &sentence[start..end];
            let offsets = (start, end);
            // A fused unknown run can still spell a piece (the map lookup of
            // `tokenizers`' model finds it then).
            let id = match id.or_else(|| self.id_of(text)) {
                Some(id) => id,
                None => {
                    if self.byte_fallback {
                        let bytes: Option<Vec<Token>> = text
                            .bytes()
                            .map(|b| {
                                let name = format!("<0x{b:02X}>");
                                self.id_of(&name).map(|id| Token::new(id, name, offsets))
                            })
                            .collect();
                        if let Some(bytes) = bytes {
                            tokens.extend(bytes);
                            continue;
                        }
                    }
                    self.unk_id.ok_or("no unknown token")?
                }
            };
            tokens.push(Token::new(id, text.to_string(), offsets));
        }
        Ok(tokens)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id_of(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.piece(id).map(str::to_string)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        (0..self.ends.len() as u32)
            .filter_map(|id| self.piece(id).map(|p| (p.to_string(), id)))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.ends.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("the compact Unigram model is built from tokenizer.json and not saved".into())
    }

    fn get_trainer(&self) -> UnigramTrainer {
        UnigramTrainer::default()
    }
}

/// The model of a loaded `tokenizer.json`: the compact Unigram where the file
/// has a Unigram model, else whatever `tokenizers` reads (WordPiece, BPE).
pub enum TextModel {
    /// A Unigram model, compact.
    Unigram(Box<CompactUnigram>),
    /// Any other model, as `tokenizers` has it.
    Other(Box<ModelWrapper>),
}

impl Model for TextModel {
    type Trainer = TrainerWrapper;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        match self {
            Self::Unigram(m) => m.tokenize(sequence),
            Self::Other(m) => m.tokenize(sequence),
        }
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::Unigram(m) => m.token_to_id(token),
            Self::Other(m) => m.token_to_id(token),
        }
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Self::Unigram(m) => m.id_to_token(id),
            Self::Other(m) => m.id_to_token(id),
        }
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        match self {
            Self::Unigram(m) => m.get_vocab(),
            Self::Other(m) => m.get_vocab(),
        }
    }

    fn get_vocab_size(&self) -> usize {
        match self {
            Self::Unigram(m) => m.get_vocab_size(),
            Self::Other(m) => m.get_vocab_size(),
        }
    }

    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        match self {
            Self::Unigram(m) => m.save(folder, prefix),
            Self::Other(m) => m.save(folder, prefix),
        }
    }

    fn get_trainer(&self) -> TrainerWrapper {
        match self {
            Self::Unigram(m) => TrainerWrapper::UnigramTrainer(m.get_trainer()),
            Self::Other(m) => m.get_trainer(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::unigram::Unigram;

    fn ids(model: &impl Model, text: &str) -> Vec<(u32, (usize, usize))> {
        model
            .tokenize(text)
            .unwrap()
            .into_iter()
            .map(|t| (t.id, t.offsets))
            .collect()
    }

    /// The same pieces, ids and offsets as `tokenizers`' Unigram on a small
    /// vocabulary with ties, duplicates, unknown runs and byte fallback.
    #[test]
    fn segments_as_the_tokenizers_crate_does() {
        let vocab: Vec<(String, f64)> = [
            ("<unk>", 0.0),
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.5),
            ("d", -2.0),
            ("cd", -2.0),
            ("ab", -1.5),
            ("abc", -3.0),
            ("abcd", -2.5),
            ("bc", -1.0),
            ("中", -1.0),
            ("中文", -1.2),
            ("ab", -0.5),
            ("<0xE6>", -5.0),
            ("<0x97>", -5.0),
            ("<0xA5>", -5.0),
            ("x", -3.0),
            ("<", -4.0),
            ("k>", -4.0),
        ]
        .iter()
        .map(|(p, s)| (p.to_string(), *s))
        .collect();
        let texts = [
            "abcdacdxx",
            "abcd",
            "bcab",
            "中文中日abc",
            "日日日",
            "yyyxzz",
            "<unk>x<unk>ab",
            "",
            "cdcdcdc",
        ];
        for byte_fallback in [false, true] {
            let reference = Unigram::from(vocab.clone(), Some(0), byte_fallback).unwrap();
            let compact = CompactUnigram::new(vocab.clone(), Some(0), byte_fallback).unwrap();
            for text in texts {
                assert_eq!(
                    ids(&compact, text),
                    ids(&reference, text),
                    "{text:?} (byte fallback {byte_fallback})"
                );
            }
            assert_eq!(compact.token_to_id("ab"), reference.token_to_id("ab"));
            assert_eq!(compact.token_to_id("zz"), None);
            assert_eq!(compact.id_to_token(11).as_deref(), Some("中文"));
        }
    }
}
