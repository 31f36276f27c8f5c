//! Finding the passages an answer cites.
//!
//! The model is asked to cite as `[n]`. Models also write `[1, 2]`, `[1][2]` or
//! `[1-3]`; all are read. A number that names no retrieved passage (the model
//! made it up, or quoted a bracketed number from a passage) is dropped, so every
//! citation returned refers to a passage the model was actually shown.

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
}
