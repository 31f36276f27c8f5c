//! A prompt as the pipeline hands it to a generation backend: numbered
//! passages that can be left out, lowest-ranked first, to fit a context.

use crate::chat::Message;

/// One passage as the model reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPassage {
    /// The line that introduces it (its number and where it comes from).
    pub heading: String,
    /// Its text, ready to read.
    pub text: String,
}

/// One answer's prompt: the messages before the question's turn (the system
/// instruction, earlier turns), then one user message made of `open`, the
/// passages best first, and `close` (the question and what is asked).
///
/// Passages come off the end: a backend that counts tokens calls [`Prompt::fit`],
/// which leaves out the lowest-ranked passages, then shortens the last one,
/// until prompt and answer fit; the numbers of the passages kept do not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Messages before the question's turn.
    pub preamble: Vec<Message>,
    /// The start of the question's turn, before the first passage.
    pub open: String,
    /// The passages, best first.
    pub passages: Vec<PromptPassage>,
    /// The rest of the question's turn, after the passages.
    pub close: String,
}

/// A prompt fitted to a context: what the measure returned for it, and how
/// many passages it kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fitted<T> {
    /// What `measure` produced for the prompt that fits (its token ids).
    pub tokens: T,
    /// Passages kept.
    pub used: usize,
    /// Whether the last passage kept was shortened.
    pub trimmed: bool,
}

impl Prompt {
    /// The messages with the first `used` passages.
    pub fn messages(&self, used: usize) -> Vec<Message> {
        let mut user = self.open.clone();
        for p in &self.passages[..used.min(self.passages.len())] {
            user.push_str(&p.heading);
            user.push_str(&p.text);
            user.push_str("\n\n");
        }
        user.push_str(&self.close);
        let mut out = self.preamble.clone();
        out.push(Message::new("user", user));
        out
    }

    /// Leaves out passages, lowest-ranked first, and then shortens the last one
    /// until `measure` finds that the prompt fits. `measure` gets the messages
    /// and returns its result (token ids) with how many tokens they are over
    /// the budget (0: they fit). When nothing more can be taken out, the last
    /// measure is returned as it is and the caller decides.
    pub fn fit<T, E>(
        &mut self,
        mut measure: impl FnMut(&[Message]) -> Result<(T, usize), E>,
    ) -> Result<Fitted<T>, E> {
        let mut used = self.passages.len();
        let mut trimmed = false;
        loop {
            let (tokens, excess) = measure(&self.messages(used))?;
            if excess == 0 {
                return Ok(Fitted {
                    tokens,
                    used,
                    trimmed,
                });
            }
            if used > 1 {
                used -= 1;
                continue;
            }
            // One passage left and still too long: shorten it by about the
            // excess (a token is at least one byte), at a character boundary.
            let text = match self.passages.first_mut() {
                Some(p) if !p.text.is_empty() => &mut p.text,
                _ => {
                    return Ok(Fitted {
                        tokens,
                        used,
                        trimmed,
                    })
                }
            };
            let mut cut = text.len().saturating_sub(excess.max(8) * 2);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            let kept = text.trim_end().len();
            text.truncate(kept);
            trimmed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(n: usize) -> Prompt {
        Prompt {
            preamble: vec![Message::new("system", "be brief")],
            open: "<p>\n".into(),
            passages: (1..=n)
                .map(|i| PromptPassage {
                    heading: format!("[{i}]\n"),
                    text: "word ".repeat(20).trim_end().to_string(),
                })
                .collect(),
            close: "Q?".into(),
        }
    }

    fn words(m: &[Message]) -> usize {
        m.iter().map(|m| m.content.split_whitespace().count()).sum()
    }

    #[test]
    fn messages_number_the_passages_inside_the_last_turn() {
        let m = prompt(2).messages(1);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].role, "user");
        assert!(m[1].content.starts_with("<p>\n[1]\nword"));
        assert!(!m[1].content.contains("[2]"));
        assert!(m[1].content.ends_with("word\n\nQ?"));
    }

    #[test]
    fn fitting_drops_the_lowest_ranked_then_trims_the_last() {
        // 2 words of preamble, 1 + 20 per passage, 1 of question.
        let mut p = prompt(3);
        let f = p
            .fit(|m| Ok::<_, ()>((words(m), words(m).saturating_sub(30))))
            .unwrap();
        assert_eq!((f.used, f.trimmed), (1, false));
        let mut p = prompt(3);
        let f = p
            .fit(|m| Ok::<_, ()>((words(m), words(m).saturating_sub(12))))
            .unwrap();
        assert_eq!((f.used, f.trimmed), (1, true));
        assert!(f.tokens <= 12);
        let mut p = prompt(3);
        let f = p.fit(|m| Ok::<_, ()>((words(m), 0))).unwrap();
        assert_eq!((f.used, f.trimmed), (3, false));
    }

    #[test]
    fn a_prompt_that_cannot_fit_is_returned_for_the_caller_to_refuse() {
        let mut p = prompt(1);
        let f = p.fit(|m| Ok::<_, ()>((words(m), 1))).unwrap();
        assert_eq!(f.used, 1);
        assert!(f.trimmed && p.passages[0].text.is_empty());
    }
}
