//! Content rules applied to what ragd hands out — answers (streamed and final)
//! and the passage text and snippets of `/search` and `/ask`: redaction of
//! personal data and a block list of terms. Each response says which rules
//! matched and how often (`content_rules`).
//!
//! Redaction rules: `email`, `phone` (international or national numbers of 9
//! to 15 digits, with the usual separators), `ipv4`, `card` (13–19 digit card
//! numbers that pass the Luhn check). Matches become `[email]`, `[phone]`, …;
//! blocked terms (whole words, any case) become `[blocked]`.

use std::collections::BTreeMap;

use regex::Regex;

use crate::error::ConfigError;
use serde::Serialize;

/// The redaction rules ragd knows.
pub const RULES: [&str; 4] = ["email", "phone", "ipv4", "card"];

/// How often a rule matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Applied {
    /// `email`, `phone`, `ipv4`, `card` or `block_list`.
    pub rule: String,
    /// Matches replaced.
    pub count: usize,
}

/// The configured rules, compiled.
#[derive(Debug, Clone, Default)]
pub struct ContentRules {
    rules: Vec<(&'static str, Regex)>,
    blocked: Option<Regex>,
}

/// Counts of matches per rule, kept while a response is assembled.
#[derive(Debug, Clone, Default)]
pub struct Tally(BTreeMap<String, usize>);

impl Tally {
    /// What was applied, by rule name.
    pub fn applied(&self) -> Vec<Applied> {
        self.0
            .iter()
            .map(|(rule, &count)| Applied {
                rule: rule.clone(),
                count,
            })
            .collect()
    }

    /// Adds `count` matches of `rule` (nothing when 0).
    pub fn add(&mut self, rule: &str, count: usize) {
        if count > 0 {
            *self.0.entry(rule.to_string()).or_default() += count;
        }
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
}

impl ContentRules {
    /// Compiles `redact` (rule names) and `block_terms`; an unknown rule or an
    /// empty term is an error naming it.
    pub fn new(redact: &[String], block_terms: &[String]) -> Result<Self, ConfigError> {
        let mut rules = Vec::new();
        for name in redact {
            let pattern = match name.as_str() {
                "email" => r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b",
                // A leading + or digit, then digits with single separators.
                "phone" => r"(?:\+|\b)\d(?:[ .\-]?\(?\d\)?){8,14}\b",
                "ipv4" => {
                    r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"
                }
                "card" => r"\b\d(?:[ -]?\d){12,18}\b",
                other => {
                    return Err(ConfigError(format!(
                        "answers.redact: unknown rule {other:?} (known: {})",
                        RULES.join(", ")
                    )))
                }
            };
            let name = RULES
                .iter()
                .find(|r| **r == name)
                .copied()
                .unwrap_or("email");
            rules.push((
                name,
                Regex::new(pattern).map_err(|e| ConfigError(e.to_string()))?,
            ));
        }
        // Cards and addresses before phones: a card number or an IPv4 address
        // also reads as a run of digits.
        rules.sort_by_key(|(n, _)| {
            ["card", "email", "ipv4", "phone"]
                .iter()
                .position(|r| r == n)
        });
        rules.dedup_by_key(|(n, _)| *n);
        let mut terms = Vec::new();
        for t in block_terms {
            let t = t.trim();
            if t.is_empty() {
                return Err(ConfigError("answers.block_terms: a term is empty".into()));
            }
            terms.push(regex::escape(t));
        }
        let blocked = if terms.is_empty() {
            None
        } else {
            Some(
                Regex::new(&format!(r"(?i)\b(?:{})\b", terms.join("|")))
                    .map_err(|e| ConfigError(e.to_string()))?,
            )
        };
        Ok(Self { rules, blocked })
    }

    /// Whether any rule is configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.blocked.is_none()
    }

    /// `text` with every rule applied, counting matches into `tally`.
    pub fn apply(&self, text: &str, tally: &mut Tally) -> String {
        let mut out = text.to_string();
        for (name, re) in &self.rules {
            let mut count = 0;
            out = re
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    let m = &c[0];
                    if *name == "card" && !luhn(m) {
                        return m.to_string();
                    }
                    count += 1;
                    format!("[{name}]")
                })
                .into_owned();
            if count > 0 {
                *tally.0.entry(name.to_string()).or_default() += count;
            }
        }
        if let Some(re) = &self.blocked {
            let count = re.find_iter(&out).count();
            if count > 0 {
                out = re.replace_all(&out, "[blocked]").into_owned();
                *tally.0.entry("block_list".into()).or_default() += count;
            }
        }
        out
    }

    /// Byte ranges of every match of every rule in `text`.
    fn matches(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        self.rules
            .iter()
            .map(|(_, re)| re)
            .chain(&self.blocked)
            .flat_map(|re| re.find_iter(text).map(|m| m.range()))
            .collect()
    }

    /// A filter for streamed text: it holds back the last [`HOLD_BACK`]
    /// characters (a match is never longer), so a number or address split
    /// across tokens is redacted whole.
    pub fn stream(self: &std::sync::Arc<Self>) -> StreamFilter {
        StreamFilter {
            rules: std::sync::Arc::clone(self),
            pending: String::new(),
            tally: Tally::default(),
        }
    }
}

/// Characters a streaming filter keeps back.
pub const HOLD_BACK: usize = 96;

/// See [`ContentRules::stream`].
#[derive(Debug)]
pub struct StreamFilter {
    rules: std::sync::Arc<ContentRules>,
    pending: String,
    tally: Tally,
}

impl StreamFilter {
    /// What the filter has replaced so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Takes a piece of the answer; returns what can be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.rules.is_empty() {
            return piece.to_string();
        }
        self.pending.push_str(piece);
        let chars = self.pending.chars().count();
        if chars <= HOLD_BACK {
            return String::new();
        }
        // Cut at whitespace before the held-back tail, outside any match.
        let limit = self
            .pending
            .char_indices()
            .nth(chars - HOLD_BACK)
            .map_or(0, |(i, _)| i);
        let Some(mut cut) = self.pending[..limit].rfind(char::is_whitespace) else {
            return String::new();
        };
        // Never cut through a match (a phone number has spaces in it).
        let matches = self.rules.matches(&self.pending);
        while let Some(m) = matches.iter().find(|m| m.start < cut && cut < m.end) {
            cut = m.start;
        }
        if cut == 0 {
            return String::new();
        }
        let head: String = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        let mut tally = Tally::default();
        let out = self.rules.apply(&head, &mut tally);
        self.tally.merge(&tally);
        out
    }

    /// The rest, at the end of the answer.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        let mut tally = Tally::default();
        let out = self.rules.apply(&rest, &mut tally);
        self.tally.merge(&tally);
        out
    }
}

fn luhn(number: &str) -> bool {
    let digits: Vec<u32> = number.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[&str], b: &[&str]) -> ContentRules {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        ContentRules::new(&s(r), &s(b)).unwrap()
    }

    #[test]
    fn redacts_personal_data_and_counts_it() {
        let r = rules(&["email", "phone", "ipv4", "card"], &[]);
        let mut t = Tally::default();
        let out = r.apply(
            "Write to debian-user@lists.debian.org or Jane.Doe+x@example.co.uk, call +49 30 1234 5678 \
             or (555) 123-4567; server 192.168.1.20; card 4111 1111 1111 1111.",
            &mut t,
        );
        assert_eq!(
            out,
            "Write to [email] or [email], call [phone] or ([phone]; server [ipv4]; card [card]."
        );
        assert_eq!(
            t.applied(),
            vec![
                Applied {
                    rule: "card".into(),
                    count: 1
                },
                Applied {
                    rule: "email".into(),
                    count: 2
                },
                Applied {
                    rule: "ipv4".into(),
                    count: 1
                },
                Applied {
                    rule: "phone".into(),
                    count: 2
                },
            ]
        );
    }

    #[test]
    fn leaves_versions_years_and_short_numbers_alone() {
        let r = rules(&["email", "phone", "ipv4", "card"], &[]);
        let mut t = Tally::default();
        let text =
            "Debian 12.5 came out in 2024 with kernel 6.1.0-18; 59100 packages; port 8080; 1.2.3.";
        assert_eq!(r.apply(text, &mut t), text);
        assert!(t.applied().is_empty());
        // A 16-digit number failing the Luhn check is not a card.
        assert!(!r.apply("id 4111 1111 1111 1112", &mut t).contains("[card]"));
    }

    #[test]
    fn block_list_matches_whole_words_in_any_case() {
        let r = rules(&[], &["Secret Project", "foo"]);
        let mut t = Tally::default();
        assert_eq!(
            r.apply("The secret project uses FOO, not food.", &mut t),
            "The [blocked] uses [blocked], not food."
        );
        assert_eq!(
            t.applied(),
            vec![Applied {
                rule: "block_list".into(),
                count: 2
            }]
        );
        assert!(ContentRules::new(&["names".into()], &[])
            .unwrap_err()
            .to_string()
            .contains("unknown rule"));
        assert!(ContentRules::new(&[], &[" ".into()]).is_err());
    }

    #[test]
    fn streaming_redacts_matches_split_across_pieces() {
        let r = rules(&["email", "phone"], &[]);
        let text = format!(
            "{} mail jane.doe@example.org or call +1 212 555 0199 today. {}",
            "Some words before the address. ".repeat(4),
            "And a long tail of words after it. ".repeat(4)
        );
        let r = std::sync::Arc::new(r);
        let mut s = r.stream();
        let mut out = String::new();
        // Three characters at a time: every match is split.
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(3) {
            out.push_str(&s.push(&piece.iter().collect::<String>()));
        }
        out.push_str(&s.finish());
        assert_eq!(out, r.apply(&text, &mut Tally::default()));
        assert!(out.contains("mail [email] or call [phone] today"), "{out}");
        assert_eq!(s.tally().applied().len(), 2);
        // No rules: pieces pass straight through.
        let none = std::sync::Arc::new(ContentRules::default());
        assert_eq!(none.stream().push("abc"), "abc");
    }
}
