//! Ingest stage (optional, `ingest.generate_questions = N`): the answer model
//! writes N questions each new chunk answers. They are indexed lexically with
//! the chunk (BM25 over title, section, questions and text), so a user's
//! question meets questions phrased like it, not only the passage's own
//! wording; they are not embedded with it (that lowered dense retrieval, see
//! the README). They are stored with the chunk and reused while its text is
//! unchanged; they are never given to the answer model as document text.
//!
//! It costs one greedy generation per chunk (seconds on a CPU), which is why it
//! is off by default; see the README for what it gained and cost.

use std::time::{Duration, Instant};

use ragd_core::{Generate, GenerateParams, Prompt};

use crate::complete::{complete, Completion};
use crate::language::{self, Lang};

/// Most questions per chunk a configuration may ask for.
pub const MAX_QUESTIONS: usize = 10;

/// Longest a chunk's questions may take, waiting for the model included.
const WITHIN: Duration = Duration::from_secs(120);

/// Tokens allowed per question asked for.
const TOKENS_PER_QUESTION: usize = 32;

/// The request after the passage, in the passage's language: a small model
/// follows an instruction that comes last, and answers in its language.
fn instruction(n: usize, lang: Lang) -> String {
    match lang {
        Lang::Zh => format!(
            "请根据上面的段落，写出 {n} 个读者可能会问、而这段文字能够回答的简短问题。每行一个问题，不要编号，不要回答。"
        ),
        _ => format!(
            "Write {n} different short questions that a reader might ask and that the passage above answers. One question per line, no numbers, no answers."
        ),
    }
}

/// Up to `n` questions that the chunk `text` (of a document titled `title`)
/// answers; empty when the model fails or is busy for too long (the chunk is
/// then stored without, and a warning logged).
pub async fn questions(
    generator: &dyn Generate,
    title: Option<&str>,
    text: &str,
    n: usize,
) -> Vec<String> {
    if n == 0 {
        return Vec::new();
    }
    let deadline = Instant::now() + WITHIN;
    let mut passage = String::with_capacity(text.len() + 64);
    if let Some(t) = title.filter(|t| !t.trim().is_empty()) {
        passage.push_str(t.trim());
        passage.push_str("\n\n");
    }
    passage.push_str(text.trim());
    let ask = instruction(n, language::detect(text));
    loop {
        let prompt = Prompt {
            preamble: Vec::new(),
            open: String::new(),
            passages: Vec::new(),
            close: format!("{passage}\n\n{ask}"),
        };
        let params = GenerateParams {
            max_tokens: TOKENS_PER_QUESTION * n,
            temperature: 0.0,
            repeat_penalty: 1.1,
            deadline: Some(deadline),
            ..GenerateParams::default()
        };
        match complete(generator, prompt, params).await {
            Completion::Text(reply) => {
                tracing::debug!(%reply, "questions written");
                return parse(&reply, n);
            }
            // The queue is full of answers: ingest waits its turn.
            Completion::Busy if Instant::now() + Duration::from_secs(1) < deadline => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Completion::Busy => {
                tracing::warn!("no questions generated for a chunk: the model stayed busy");
                return Vec::new();
            }
            Completion::Failed(e) => {
                tracing::warn!(error = ?e, "no questions generated for a chunk");
                return Vec::new();
            }
        }
    }
}

/// The model's reply as questions: one per line, numbering, bullets and
/// labels off, only lines that end as questions, no repeats, at most `n`.
fn parse(reply: &str, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in reply.lines() {
        let mut q = line.trim();
        q = q.trim_start_matches(|c: char| {
            c.is_ascii_digit() || matches!(c, '.' | ')' | '-' | '*' | '•' | '、' | '．' | ' ')
        });
        for label in ["Question:", "Q:", "问题：", "问："] {
            q = q.strip_prefix(label).unwrap_or(q).trim();
        }
        let q = q.trim_matches(|c| matches!(c, '"' | '“' | '”')).trim();
        let is_question = q.ends_with('?') || q.ends_with('？');
        if is_question && q.chars().count() >= 5 && !out.iter().any(|o| o == q) {
            out.push(q.to_string());
        }
        if out.len() == n {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_become_clean_questions() {
        let reply = "1. What is Debian?\n2) How do I upgrade?\n- How do I upgrade?\n\
                     Here are some questions:\n* 如何升级 Debian？\nQ: Why?";
        assert_eq!(
            parse(reply, 5),
            vec!["What is Debian?", "How do I upgrade?", "如何升级 Debian？"]
        );
        assert_eq!(parse(reply, 1), vec!["What is Debian?"]);
        assert!(parse("Debian is an operating system.", 3).is_empty());
    }
}
