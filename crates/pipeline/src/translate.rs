//! Ask and search stage: a question not in English, put into English by the
//! answer model, so that retrieval can also search with the models and words
//! that read English documents best.
//!
//! The multilingual embedder finds English passages for a Chinese question,
//! but less often than the English embedder finds them for the same question
//! in English, and the lexical side cannot match Chinese words against
//! English text at all. With `retrieval.translate_queries`, such a question
//! is also searched in English ([`crate::route`]: both embedders and BM25)
//! and every ranking is fused. The answer model translates greedily, in one
//! short line; if it is busy, fails or returns nothing usable, the question is
//! searched as it was written. The translation only finds passages: the
//! scores, thresholds and the answer still use the question itself.

use std::time::{Duration, Instant};

use ragd_core::{Generate, GenerateParams, Message, Prompt};

use crate::complete::{complete, Completion};
use crate::language::{self, Lang};

/// What the model is told.
const INSTRUCTION: &str = "Translate the user's question into English. \
Reply with the English question only, on one line, without explanations.";

/// Longest translation in tokens.
const MAX_TOKENS: usize = 64;

/// The English version of `question`, or `None` when there is none to be had
/// in `within` (busy generator, failure, an empty or untranslated reply).
pub async fn to_english(
    generator: &dyn Generate,
    question: &str,
    within: Duration,
) -> Option<String> {
    let params = GenerateParams {
        max_tokens: MAX_TOKENS,
        temperature: 0.0,
        stop: vec!["\n".into()],
        repeat_penalty: 1.0,
        deadline: Some(Instant::now() + within),
        ..GenerateParams::default()
    };
    match complete(generator, prompt(question), params).await {
        Completion::Text(text) => usable(&text),
        Completion::Busy => None,
        Completion::Failed(e) => {
            if let Some(e) = e {
                tracing::warn!(error = %e, "question not translated");
            }
            None
        }
    }
}

/// What the model reads to translate `question`.
fn prompt(question: &str) -> Prompt {
    Prompt {
        preamble: vec![Message::new("system", INSTRUCTION)],
        open: String::new(),
        passages: Vec::new(),
        close: question.trim().to_string(),
    }
}

/// Translation prompts for unlike questions: the tokens they all start with
/// (chat markup, the instruction) can be read once at load, as the answers'
/// are ([`crate::prompt::prefix_samples`]), so that a question's translation
/// reads only the question.
pub fn prefix_samples() -> Vec<Vec<Message>> {
    ["天空为什么是蓝色的？", "¿Qué es Debian?"]
        .into_iter()
        .map(|q| prompt(q).messages(0))
        .collect()
}

/// The model's reply as a query: one line, quotes and labels off, and only
/// when it reads as English.
fn usable(reply: &str) -> Option<String> {
    let line = reply.lines().find(|l| !l.trim().is_empty())?.trim();
    let line = line
        .strip_prefix("English:")
        .or_else(|| line.strip_prefix("Translation:"))
        .unwrap_or(line)
        .trim()
        .trim_matches(|c| matches!(c, '"' | '“' | '”' | '\''))
        .trim();
    (!line.is_empty() && language::detect(line) == Lang::En).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples differ only in the question, so the tokens they share
    /// are the chat markup and the instruction every translation reads.
    #[test]
    fn translation_prompts_differ_only_in_the_question() {
        let samples = prefix_samples();
        assert!(samples.len() >= 2);
        for s in &samples {
            assert_eq!(s[..s.len() - 1], samples[0][..s.len() - 1]);
            assert!(s.iter().any(|m| m.content == INSTRUCTION));
        }
        assert_ne!(samples[0].last(), samples[1].last());
    }

    #[test]
    fn only_an_english_line_is_used() {
        assert_eq!(
            usable("\"How do I upgrade Debian?\"\n").as_deref(),
            Some("How do I upgrade Debian?")
        );
        assert_eq!(
            usable("English: What is a package?").as_deref(),
            Some("What is a package?")
        );
        assert_eq!(usable("如何升级 Debian？"), None);
        assert_eq!(usable("   \n"), None);
    }
}
