//! Ask stage: checking the answer — the passages each sentence rests on.
//!
//! The model is asked to cite as `[n]`. Models also write `[1, 2]`, `[1][2]` or
//! `[1-3]`; all are read. A number that names no retrieved passage (the model
//! made it up, or quoted a bracketed number from a passage) is dropped, so every
//! citation returned refers to a passage the model was actually shown.
//!
//! Small models cite unreliably: they omit markers, put `[2]` after a fact from
//! passage 1, or cite a number no passage has. So every marker is checked
//! against what its sentence says ([`check`]): the answer is cut into
//! sentences, and each sentence's support by each passage is measured
//! ([`support_matrix`]): the mean of the cosine between the sentence's and the
//! passage's embeddings and the share of the sentence's content words found in
//! the passage, each word weighted by how few of the prompt's passages contain
//! it (words every passage has say little about which one the sentence came
//! from). A marker is kept when its passage supports the
//! sentence (at least `min_support`, and within a small margin of the best
//! passage); otherwise it is re-pointed to the passage that does support the
//! sentence, or removed when none does. A sentence without a marker is
//! attributed to the passage that supports it. Each change is reported.

use serde::Serialize;

/// How a citation was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CitedBy {
    /// The model wrote the marker and the sentence matches the passage.
    Model,
    /// The model wrote no usable marker; the sentence matches this passage best.
    Similarity,
    /// The model's marker pointed at a passage that does not support the
    /// sentence; ragd pointed it at the one that does.
    Repointed,
    /// The model's answer was not supported; ragd quoted this passage instead
    /// (an extractive answer).
    Quoted,
}

/// Passages whose support of a sentence is within this much of the best
/// passage's (and at least `min_support`) support it about equally; the
/// sentence is cited to the highest-ranked of them.
const MARKER_MARGIN: f32 = 0.1;
/// A sentence without a marker is attributed to its best passage only when that
/// passage leads the next one by this much: a sentence two passages support
/// equally (a generic statement) does not say where it came from.
const ATTRIBUTION_LEAD: f32 = 0.05;

/// A sentence of the answer: its text without citation markers, and the
/// passage numbers it cites.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The sentence with its markers removed.
    pub text: String,
    /// Valid passage numbers cited in it.
    pub markers: Vec<usize>,
    /// Its bracket groups in the answer (`[2]`, `[1, 3]`): byte range and every
    /// number written, in range or not.
    pub groups: Vec<(std::ops::Range<usize>, Vec<usize>)>,
}

/// The bracket groups of `s` that read as citations, with byte ranges offset
/// by `base`.
fn groups_in(s: &str, base: usize) -> Vec<(std::ops::Range<usize>, Vec<usize>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = s[at..].find('[') {
        let open = at + open;
        let after = &s[open + 1..];
        let Some(close) = after.find(']') else { break };
        match parse_list(&after[..close]) {
            Some(numbers) => {
                let end = open + 1 + close + 1;
                out.push((base + open..base + end, numbers));
                at = end;
            }
            None => at = open + 1,
        }
    }
    out
}

/// Cuts `answer` into sentences; a marker standing alone (`... metres. [1]`)
/// belongs to the sentence before it.
pub fn segments(answer: &str, passages: usize) -> Vec<Segment> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut chars = answer.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next_is_space = chars.peek().is_none_or(|(_, n)| n.is_whitespace());
        let cut = c == '\n'
            || matches!(c, '。' | '！' | '？')
            || (matches!(c, '.' | '!' | '?') && next_is_space);
        if cut {
            let end = i + c.len_utf8();
            pieces.push(&answer[start..end]);
            start = end;
        }
    }
    pieces.push(&answer[start..]);
    let mut out: Vec<Segment> = Vec::new();
    for piece in pieces {
        let base = piece.as_ptr() as usize - answer.as_ptr() as usize;
        // Markers before any text of a sentence close the previous sentence when
        // it has none of its own (`high. [1] Cats ...`).
        let trimmed = piece.trim_start();
        let base = base + (piece.len() - trimmed.len());
        let lead_len = leading_markers_len(trimmed);
        let (lead, piece) = trimmed.split_at(lead_len);
        let mut lead_markers = cited(lead, passages);
        let mut lead_groups = groups_in(lead, base);
        if let Some(last) = out
            .last_mut()
            .filter(|l| l.markers.is_empty() && l.groups.is_empty())
        {
            last.markers.append(&mut lead_markers);
            last.groups.append(&mut lead_groups);
        }
        let mut markers = lead_markers;
        let mut groups = lead_groups;
        for m in cited(piece, passages) {
            if !markers.contains(&m) {
                markers.push(m);
            }
        }
        groups.extend(groups_in(piece, base + lead_len));
        let text = strip_markers(piece);
        let content = text.chars().filter(|c| c.is_alphanumeric()).count();
        if content < 2 {
            if let Some(last) = out.last_mut() {
                for m in markers {
                    if !last.markers.contains(&m) {
                        last.markers.push(m);
                    }
                }
                last.groups.extend(groups);
            }
            continue;
        }
        out.push(Segment {
            text,
            markers,
            groups,
        });
    }
    out
}

/// Length of the run of citation markers (and spaces) that `s` starts with.
fn leading_markers_len(s: &str) -> usize {
    let mut at = 0;
    loop {
        let rest = &s[at..];
        let spaces = rest.len() - rest.trim_start().len();
        let rest = &rest[spaces..];
        match rest
            .strip_prefix('[')
            .and_then(|r| r.find(']').map(|c| (r, c)))
        {
            Some((r, close)) if parse_list(&r[..close]).is_some() => at += spaces + close + 2,
            _ => return at,
        }
    }
}

/// Whether `text` says anything besides citation markers (a marker still being
/// written, "[1", counts as a marker).
pub fn has_words(text: &str) -> bool {
    let s = strip_markers(text);
    let s = match s.rfind('[') {
        Some(i) if !s[i..].contains(']') => &s[..i],
        _ => &s[..],
    };
    s.chars().any(char::is_alphanumeric)
}

/// How an answer may go on (see `GenerateParams::steer`): it may not end before
/// it says something besides markers, it may not begin by echoing a passage's
/// "(heading)" or the "<passages>" fence, and after a first marker comes text,
/// not more markers. Left free, the 0.5B default model answered 18 of the 123
/// Debian FAQ questions with "[1] [2] [3]" alone and began 11 with a heading.
pub fn steer_answer(text: &str) -> ragd_core::Steer {
    if has_words(text) {
        ragd_core::Steer::FREE
    } else if text.trim().is_empty() {
        ragd_core::Steer {
            may_end: false,
            avoid: &["(", "<"],
        }
    } else {
        ragd_core::Steer {
            may_end: false,
            avoid: &["[", "(", "<"],
        }
    }
}

fn strip_markers(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if parse_list(&after[..close]).is_some() => {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// A citation the check changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Change {
    /// The sentence (index into `grounding.sentences`).
    pub sentence: usize,
    /// The number the model wrote.
    pub from: usize,
    /// The passage it now points to; `None`: removed.
    pub to: Option<usize>,
}

/// How well one sentence of the answer is supported.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SentenceSupport {
    /// The sentence, without markers.
    pub text: String,
    /// Its best support by any passage (0–1).
    pub score: f32,
    /// That passage, when it supports the sentence.
    pub passage: Option<usize>,
    /// Whether some passage supports it.
    pub supported: bool,
}

/// The answer after the check.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The answer with unsupported markers removed or re-pointed.
    pub text: String,
    /// Citations in order of first appearance, with how each was found.
    pub citations: Vec<(usize, CitedBy)>,
    /// What was changed.
    pub changes: Vec<Change>,
    /// Support per sentence.
    pub sentences: Vec<SentenceSupport>,
}

/// Checks the markers of `answer` (cut into `segments`) against
/// `support[s][p]`, the support of sentence `s` by passage `p + 1`.
pub fn check(
    answer: &str,
    segments: &[Segment],
    support: &[Vec<f32>],
    min_support: f32,
) -> Checked {
    let mut citations: Vec<(usize, CitedBy)> = Vec::new();
    let add = |n: usize, by: CitedBy, out: &mut Vec<(usize, CitedBy)>| {
        if !out.iter().any(|(m, _)| *m == n) {
            out.push((n, by));
        }
    };
    let mut changes = Vec::new();
    let mut sentences = Vec::new();
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for (i, (seg, sup)) in segments.iter().zip(support).enumerate() {
        let best = sup
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(p, &v)| (p + 1, v));
        let supported_by = best.filter(|&(_, v)| v >= min_support).map(|(p, _)| p);
        let best_score = best.map_or(0.0, |(_, v)| v);
        // Between passages that support the sentence about equally, retrieval's
        // order decides, not the model's marker: on the Debian FAQ the model's
        // citations of the first passage were of a relevant document 73 % of
        // the time, of passages 2-4 only 28 %.
        let preferred = supported_by.and_then(|_| {
            sup.iter()
                .position(|&v| v >= min_support && v >= best_score - MARKER_MARGIN)
                .map(|p| p + 1)
        });
        sentences.push(SentenceSupport {
            text: seg.text.clone(),
            score: best_score,
            passage: supported_by,
            supported: supported_by.is_some(),
        });
        let mut seen: Vec<usize> = Vec::new();
        for (range, numbers) in &seg.groups {
            let mut kept = Vec::new();
            for &n in numbers {
                let to = if Some(n) == preferred {
                    add(n, CitedBy::Model, &mut citations);
                    Some(n)
                } else {
                    let to = preferred;
                    if let Some(p) = to {
                        add(p, CitedBy::Repointed, &mut citations);
                    }
                    changes.push(Change {
                        sentence: i,
                        from: n,
                        to,
                    });
                    to
                };
                if let Some(t) = to.filter(|t| !seen.contains(t)) {
                    seen.push(t);
                    kept.push(t);
                }
            }
            if kept != *numbers {
                let text = match kept.as_slice() {
                    [] => String::new(),
                    k => format!(
                        "[{}]",
                        k.iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                edits.push((range.clone(), text));
            }
        }
        if seen.is_empty() {
            let second = sup
                .iter()
                .enumerate()
                .filter(|(p, _)| Some(p + 1) != supported_by)
                .map(|(_, &v)| v)
                .fold(f32::MIN, f32::max);
            if let Some(p) = supported_by.filter(|_| best_score - second >= ATTRIBUTION_LEAD) {
                add(p, CitedBy::Similarity, &mut citations);
            }
        }
    }
    edits.sort_by_key(|(r, _)| r.start);
    let mut text = String::with_capacity(answer.len());
    let mut at = 0;
    for (range, replacement) in edits {
        if range.start < at || range.end > answer.len() {
            continue;
        }
        let mut head = &answer[at..range.start];
        if replacement.is_empty() {
            head = head.trim_end_matches(' ');
        }
        text.push_str(head);
        text.push_str(&replacement);
        at = range.end;
    }
    text.push_str(&answer[at..]);
    Checked {
        text: text.trim().to_string(),
        citations,
        changes,
        sentences,
    }
}

/// `support[s][p]`: how well passage `p` supports sentence `s`, from the
/// sentences' embeddings and the passages' (text, embedding). The mean of the
/// cosine and the weighted share of the sentence's content words the passage
/// contains ([`lexical_support`]); the cosine alone for a sentence that shares
/// no word with any passage (an answer in another language than the documents).
/// The cosine is first rescaled so that the cosine of unrelated texts for the
/// model that embedded the sentence (`floors[s]`: about 0 for
/// all-MiniLM-L6-v2, 0.75 for multilingual-e5-small) becomes 0 and 1 stays 1:
/// otherwise any Chinese sentence would look supported by any passage.
pub fn support_matrix(
    sentences: &[(&str, &[f32])],
    floors: &[f32],
    passages: &[(&str, &[f32])],
) -> Vec<Vec<f32>> {
    let passage_words: Vec<std::collections::HashSet<String>> = passages
        .iter()
        .map(|(t, _)| content_words(t).into_iter().collect())
        .collect();
    sentences
        .iter()
        .enumerate()
        .map(|(i, (text, v))| {
            let lexical = lexical_support(text, &passage_words);
            let floor = floors.get(i).copied().unwrap_or(0.0).clamp(0.0, 0.99);
            passages
                .iter()
                .zip(&lexical)
                .map(|((_, pv), &lex)| {
                    let raw: f32 = v.iter().zip(pv.iter()).map(|(a, b)| a * b).sum();
                    let cosine = (raw - floor) / (1.0 - floor);
                    if lexical.iter().all(|&l| l == 0.0) {
                        cosine
                    } else {
                        0.5 * cosine + 0.5 * lex
                    }
                })
                .collect()
        })
        .collect()
}

/// For each passage (given as its set of content words), the share of
/// `sentence`'s content words (English words without stop words, lightly
/// stemmed; Han text as character pairs) it contains, each word weighted by
/// `ln(1 + (k + 1) / (df + 1))` where `df` of the `k` passages contain it.
pub fn lexical_support(sentence: &str, passages: &[std::collections::HashSet<String>]) -> Vec<f32> {
    let words = content_words(sentence);
    let k = passages.len() as f32;
    let weight = |w: &String| {
        let df = passages.iter().filter(|p| p.contains(w)).count() as f32;
        (1.0 + (k + 1.0) / (df + 1.0)).ln()
    };
    let weights: Vec<f32> = words.iter().map(weight).collect();
    let total: f32 = weights.iter().sum();
    passages
        .iter()
        .map(|p| {
            if total == 0.0 {
                return 0.0;
            }
            words
                .iter()
                .zip(&weights)
                .filter(|(w, _)| p.contains(*w))
                .map(|(_, &x)| x)
                .sum::<f32>()
                / total
        })
        .collect()
}

pub(crate) fn content_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut han: Vec<char> = Vec::new();
    let flush_han = |han: &mut Vec<char>, out: &mut Vec<String>| {
        match han.len() {
            0 => {}
            1 => out.push(han[0].to_string()),
            _ => out.extend(han.windows(2).map(|w| w.iter().collect::<String>())),
        }
        han.clear();
    };
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        let mut latin = String::new();
        for c in word.chars() {
            if matches!(c as u32, 0x3400..=0x9FFF | 0xF900..=0xFAFF) {
                if !latin.is_empty() {
                    push_word(std::mem::take(&mut latin), &mut out);
                }
                han.push(c);
            } else {
                flush_han(&mut han, &mut out);
                latin.extend(c.to_lowercase());
            }
        }
        flush_han(&mut han, &mut out);
        if !latin.is_empty() {
            push_word(latin, &mut out);
        }
    }
    out
}

fn push_word(w: String, out: &mut Vec<String>) {
    if ragd_core::STOP_WORDS.contains(&w.as_str())
        || (w.chars().count() < 2 && !w.chars().all(|c| c.is_ascii_digit()))
    {
        return;
    }
    let stem = match w.strip_suffix('s') {
        Some(s) if s.len() >= 3 && !s.ends_with('s') => s.to_string(),
        _ => w,
    };
    out.push(stem);
}

/// The passage numbers cited in `answer`, in order of first appearance, keeping
/// only those within `1..=passages`.
pub fn cited(answer: &str, passages: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inside = &after[..close];
        if let Some(numbers) = parse_list(inside) {
            for n in numbers {
                if (1..=passages).contains(&n) && !out.contains(&n) {
                    out.push(n);
                }
            }
            rest = &after[close + 1..];
        } else {
            rest = after;
        }
    }
    out
}

/// `1`, `1, 2`, `1,2`, `1-3`, `1–3`; anything else is not a citation.
fn parse_list(inside: &str) -> Option<Vec<usize>> {
    let inside = inside.trim();
    if inside.is_empty() || inside.len() > 40 {
        return None;
    }
    let mut numbers = Vec::new();
    for part in inside.split([',', ';']) {
        let part = part.trim();
        if let Some((a, b)) = part.split_once(['-', '–']) {
            let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if b < a || b - a > 20 {
                return None;
            }
            numbers.extend(a..=b);
        } else {
            numbers.push(part.parse().ok()?);
        }
    }
    Some(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_alone_are_not_words() {
        assert!(!has_words(""));
        assert!(!has_words("[1] [2] [3]"));
        assert!(!has_words(" [1, 2][3] ["));
        assert!(!has_words("[1] [2"), "a marker being written");
        assert!(has_words("[1] Debian is free."));
        assert!(has_words("8,849 [1]"));
        assert!(has_words("珠穆朗玛峰 [1]"));
    }

    #[test]
    fn reads_common_citation_forms() {
        assert_eq!(cited("Stable [1]. Testing [2][3].", 3), vec![1, 2, 3]);
        assert_eq!(cited("Both [2, 1] and again [1].", 3), vec![2, 1]);
        assert_eq!(cited("Range [1-3]", 4), vec![1, 2, 3]);
        assert_eq!(cited("[ 2 ]", 2), vec![2]);
    }

    #[test]
    fn drops_numbers_outside_the_retrieved_passages() {
        assert_eq!(cited("See [4] and [0] and [2].", 3), vec![2]);
        assert!(cited("No citations here.", 3).is_empty());
    }

    #[test]
    fn ignores_brackets_that_are_not_citations() {
        assert_eq!(cited("arr[i] = x[1a]; see [1]", 2), vec![1]);
        assert_eq!(cited("[link](http://x) [2", 2), Vec::<usize>::new());
        assert_eq!(cited("[[1]]", 1), vec![1]);
    }

    #[test]
    fn segments_split_sentences_and_attach_trailing_markers() {
        let segs = segments(
            "Everest is 8,849 m high. [1] Cats purr [2]! 3.14 is pi.\n[3]",
            3,
        );
        assert_eq!(segs.len(), 3);
        assert_eq!(
            segs[0],
            Segment {
                text: "Everest is 8,849 m high.".into(),
                markers: vec![1],
                groups: vec![(25..28, vec![1])],
            }
        );
        assert_eq!(
            segs[1],
            Segment {
                text: "Cats purr !".into(),
                markers: vec![2],
                groups: vec![(39..42, vec![2])],
            }
        );
        assert_eq!(segs[2].text, "3.14 is pi.");
        assert_eq!(segs[2].markers, vec![3]);
        let segs = segments("北京是首都。[1]上海很大。", 2);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].markers, vec![1]);
    }

    fn check_of(answer: &str, support: &[Vec<f32>]) -> Checked {
        let segs = segments(answer, support[0].len());
        assert_eq!(segs.len(), support.len(), "{segs:?}");
        check(answer, &segs, support, 0.5)
    }

    #[test]
    fn a_supported_citation_is_kept() {
        let c = check_of(
            "Debian is free [1]. It has many packages [2].",
            &[vec![0.8, 0.2], vec![0.3, 0.7]],
        );
        assert_eq!(c.text, "Debian is free [1]. It has many packages [2].");
        assert_eq!(c.citations, vec![(1, CitedBy::Model), (2, CitedBy::Model)]);
        assert!(c.changes.is_empty());
        assert!(c.sentences.iter().all(|s| s.supported));
        assert_eq!(c.sentences[1].passage, Some(2));
    }

    #[test]
    fn an_unsupported_citation_is_repointed_or_removed() {
        // Sentence 1 cites [2] but passage 1 supports it: re-pointed. Sentence 2
        // cites [1] and nothing supports it: removed.
        let c = check_of(
            "Debian is free [2]. The moon is made of cheese [1].",
            &[vec![0.8, 0.2], vec![0.1, 0.2]],
        );
        assert_eq!(c.text, "Debian is free [1]. The moon is made of cheese.");
        assert_eq!(c.citations, vec![(1, CitedBy::Repointed)]);
        assert_eq!(
            c.changes,
            vec![
                Change {
                    sentence: 0,
                    from: 2,
                    to: Some(1)
                },
                Change {
                    sentence: 1,
                    from: 1,
                    to: None
                }
            ]
        );
        assert!(!c.sentences[1].supported);
        assert_eq!(c.sentences[1].passage, None);
    }

    #[test]
    fn a_misnumbered_citation_is_repointed() {
        // [7] names no passage (there are 2): pointed at the supporting one.
        let c = check_of("Stable is released every two years [7].", &[vec![0.2, 0.9]]);
        assert_eq!(c.text, "Stable is released every two years [2].");
        assert_eq!(
            c.changes,
            vec![Change {
                sentence: 0,
                from: 7,
                to: Some(2)
            }]
        );
        // A group keeps its supported members and loses the rest; duplicates go.
        let c = check_of("Both [1, 2][2].", &[vec![0.9, 0.3]]);
        assert_eq!(c.text, "Both [1].");
        assert_eq!(c.citations, vec![(1, CitedBy::Model)]);
    }

    #[test]
    fn a_sentence_two_passages_support_equally_is_not_attributed() {
        let c = check_of("Debian is an operating system.", &[vec![0.8, 0.78]]);
        assert!(c.citations.is_empty(), "{c:?}");
        assert!(c.sentences[0].supported);
    }

    #[test]
    fn unmarked_sentences_are_attributed_and_close_seconds_give_way() {
        // Passages 1 and 2 support the second sentence about equally: the
        // higher-ranked one is its citation, whatever the model marked.
        let c = check_of(
            "Testing gets packages first. Unstable is sid [1][2]. Sid is unstable [2].",
            &[vec![0.1, 0.7], vec![0.75, 0.7], vec![0.7, 0.78]],
        );
        assert_eq!(
            c.citations,
            vec![(2, CitedBy::Similarity), (1, CitedBy::Model)]
        );
        assert_eq!(
            c.text,
            "Testing gets packages first. Unstable is sid [1]. Sid is unstable [1]."
        );
        // A lower passage that supports the sentence clearly better keeps it.
        let c = check_of("Sid is unstable [2].", &[vec![0.6, 0.9]]);
        assert_eq!(c.text, "Sid is unstable [2].");
        assert_eq!(c.citations, vec![(2, CitedBy::Model)]);
    }

    fn words(t: &str) -> std::collections::HashSet<String> {
        content_words(t).into_iter().collect()
    }

    #[test]
    fn lexical_support_weights_distinctive_words() {
        let p = words("Debian releases a new stable version about every two years.");
        let q = words("Debian packages are built from source packages.");
        let s = lexical_support(
            "A new stable version is released every two years.",
            &[p.clone(), q.clone()],
        );
        assert!(s[0] > 0.7 && s[1] < 0.01, "{s:?}");
        assert!(lexical_support("Bananas are yellow.", std::slice::from_ref(&p))[0] < 0.01);
        assert_eq!(
            lexical_support("the of and", std::slice::from_ref(&p))[0],
            0.0
        );
        // "Debian" is in both passages: it counts for less than "source".
        let s = lexical_support("Debian source", &[p, q]);
        assert!(s[1] > 0.5 && s[0] < 0.5 && s[0] > 0.0, "{s:?}");
        let zh = lexical_support("稳定版每两年发布", &[words("Debian 稳定版每两年发布一次")]);
        assert!(zh[0] > 0.99);
    }

    #[test]
    fn support_blends_cosine_and_words_or_falls_back_to_cosine() {
        let v = [1.0f32, 0.0];
        let w = [0.6f32, 0.8];
        let passages = [("Debian releases a new stable version.", &w[..])];
        let s = support_matrix(&[("A new stable version.", &v[..])], &[0.0], &passages);
        assert!((s[0][0] - (0.5 * 0.6 + 0.5 * 1.0)).abs() < 1e-6, "{s:?}");
        // No shared word (another language): the cosine alone.
        let s = support_matrix(&[("Eine neue Ausgabe.", &v[..])], &[0.0], &passages);
        assert!((s[0][0] - 0.6).abs() < 1e-6, "{s:?}");
        // A model whose unrelated texts score 0.5: 0.6 is barely related.
        let s = support_matrix(&[("Eine neue Ausgabe.", &v[..])], &[0.5], &passages);
        assert!((s[0][0] - 0.2).abs() < 1e-6, "{s:?}");
    }
}
