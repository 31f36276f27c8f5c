//! Finding the passages an answer rests on.
//!
//! The model is asked to cite as `[n]`. Models also write `[1, 2]`, `[1][2]` or
//! `[1-3]`; all are read. A number that names no retrieved passage (the model
//! made it up, or quoted a bracketed number from a passage) is dropped, so every
//! citation returned refers to a passage the model was actually shown.
//!
//! Small models cite unreliably: they omit markers, or put `[2]` after a fact
//! from passage 1. So markers are checked against what the sentence says: the
//! answer is cut into sentences, each sentence is embedded and compared with the
//! passages ([`attribute`]). A marker is kept when its passage is among the ones
//! that best match its sentence; a sentence left without a kept marker is
//! attributed to its best-matching passage when the match is strong enough.
//! Each citation says which way it was found ([`CitedBy`]).

use serde::Serialize;

/// How a citation was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CitedBy {
    /// The model wrote the marker and the sentence matches the passage.
    Model,
    /// The model wrote no usable marker; the sentence matches this passage best.
    Similarity,
}

/// A marker is kept when its passage matches the sentence within this much of
/// the best-matching passage (cosine)...
const MARKER_MARGIN: f32 = 0.12;
/// ...and at least this well.
const MARKER_FLOOR: f32 = 0.15;
/// A sentence without a kept marker is attributed to its best passage at this
/// cosine or above (all-MiniLM-L6-v2: unrelated text scores below ~0.2, a
/// paraphrase of a passage's content above ~0.5).
const ATTRIBUTION_FLOOR: f32 = 0.4;

/// A sentence of the answer: its text without citation markers, and the
/// passage numbers it cites.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The sentence with its markers removed.
    pub text: String,
    /// Valid passage numbers cited in it.
    pub markers: Vec<usize>,
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
        // Markers before any text of a sentence close the previous sentence when
        // it has none of its own (`high. [1] Cats ...`).
        let trimmed = piece.trim_start();
        let lead_len = leading_markers_len(trimmed);
        let (lead, piece) = trimmed.split_at(lead_len);
        let mut lead_markers = cited(lead, passages);
        if let Some(last) = out.last_mut().filter(|l| l.markers.is_empty()) {
            last.markers.append(&mut lead_markers);
        }
        let mut markers = lead_markers;
        for m in cited(piece, passages) {
            if !markers.contains(&m) {
                markers.push(m);
            }
        }
        let text = strip_markers(piece);
        let content = text.chars().filter(|c| c.is_alphanumeric()).count();
        if content < 2 {
            if let Some(last) = out.last_mut() {
                for m in markers {
                    if !last.markers.contains(&m) {
                        last.markers.push(m);
                    }
                }
            }
            continue;
        }
        out.push(Segment { text, markers });
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

/// The citations of an answer, in order of first appearance, from its segments
/// and `similarity[s][p]`, the cosine between segment `s` and passage `p + 1`.
pub fn attribute(segments: &[Segment], similarity: &[Vec<f32>]) -> Vec<(usize, CitedBy)> {
    let mut out: Vec<(usize, CitedBy)> = Vec::new();
    let add = |n: usize, by: CitedBy, out: &mut Vec<(usize, CitedBy)>| {
        if !out.iter().any(|(m, _)| *m == n) {
            out.push((n, by));
        }
    };
    for (seg, sims) in segments.iter().zip(similarity) {
        let Some((best_p, &best)) = sims.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))
        else {
            continue;
        };
        let mut kept = false;
        for &n in &seg.markers {
            let Some(&s) = sims.get(n - 1) else { continue };
            if s >= MARKER_FLOOR && s >= best - MARKER_MARGIN {
                add(n, CitedBy::Model, &mut out);
                kept = true;
            }
        }
        if !kept && best >= ATTRIBUTION_FLOOR {
            add(best_p + 1, CitedBy::Similarity, &mut out);
        }
    }
    out
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
                markers: vec![1]
            }
        );
        assert_eq!(
            segs[1],
            Segment {
                text: "Cats purr !".into(),
                markers: vec![2]
            }
        );
        assert_eq!(segs[2].text, "3.14 is pi.");
        assert_eq!(segs[2].markers, vec![3]);
        let segs = segments("北京是首都。[1]上海很大。", 2);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].markers, vec![1]);
    }

    #[test]
    fn wrong_markers_are_dropped_and_unmarked_sentences_attributed() {
        let segs = vec![
            Segment {
                text: "a".into(),
                markers: vec![2],
            }, // cites 2, but matches 1
            Segment {
                text: "b".into(),
                markers: vec![],
            }, // matches 3 well
            Segment {
                text: "c".into(),
                markers: vec![],
            }, // matches nothing
            Segment {
                text: "d".into(),
                markers: vec![1],
            }, // close to the best: kept
        ];
        let sims = vec![
            vec![0.7, 0.2, 0.1],
            vec![0.1, 0.2, 0.6],
            vec![0.1, 0.2, 0.3],
            vec![0.5, 0.55, 0.1],
        ];
        assert_eq!(
            attribute(&segs, &sims),
            vec![(1, CitedBy::Similarity), (3, CitedBy::Similarity)]
        );
        let segs = vec![Segment {
            text: "d".into(),
            markers: vec![1],
        }];
        assert_eq!(
            attribute(&segs, &[vec![0.5, 0.55, 0.1]]),
            vec![(1, CitedBy::Model)]
        );
    }
}
