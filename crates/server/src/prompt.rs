//! Prompt assembly: the retrieved passages, numbered, and the instruction to
//! answer from them alone and cite them.
//!
//! The conversation is plain messages; the model's own chat template (in the
//! generator) turns it into the prompt format the model was trained on.

use ragd_generator::Message;

/// A retrieved passage as the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Passage {
    /// The document's title, if it has one.
    pub title: Option<String>,
    /// The chunk's text.
    pub text: String,
}

impl Passage {
    /// A passage headed by where it sits: "Title > Section > Subsection".
    pub fn located(title: Option<&str>, section: Option<&str>, text: &str) -> Self {
        let title = match (title, section) {
            (Some(t), Some(sec)) => Some(format!("{t} > {sec}")),
            (None, Some(sec)) => Some(sec.to_string()),
            (t, None) => t.map(str::to_string),
        };
        Self { title, text: text.to_string() }
    }
}

/// The system instruction.
pub const INSTRUCTION: &str = "You answer questions using only the numbered passages the user provides. \
Cite every passage you use by its number in square brackets, like [1] or [2], right after the statement it supports. \
If the passages do not contain the answer, say that you don't know. Do not use any other knowledge.";

/// The messages for `question` over `passages`, numbered from 1.
pub fn messages(question: &str, passages: &[Passage]) -> Vec<Message> {
    let mut user = String::from("Passages:\n");
    for (i, p) in passages.iter().enumerate() {
        user.push_str(&format!("\n[{}] ", i + 1));
        if let Some(t) = p.title.as_deref().filter(|t| !t.trim().is_empty()) {
            user.push_str(t.trim());
            user.push('\n');
        }
        user.push_str(p.text.trim());
        user.push('\n');
    }
    user.push_str(&format!("\nQuestion: {}", question.trim()));
    vec![
        Message::new("system", INSTRUCTION),
        Message::new("user", user),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passages_are_numbered_from_one_with_titles() {
        let m = messages(
            " Why? ",
            &[
                Passage {
                    title: Some("Cats".into()),
                    text: "Cats purr.".into(),
                },
                Passage {
                    title: None,
                    text: " Dogs bark. ".into(),
                },
            ],
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        let u = &m[1].content;
        assert!(u.contains("[1] Cats\nCats purr.\n"), "{u}");
        assert!(u.contains("[2] Dogs bark.\n"), "{u}");
        assert!(u.ends_with("\nQuestion: Why?"), "{u}");
    }
}
