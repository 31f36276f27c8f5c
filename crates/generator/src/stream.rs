//! Turning generated token bytes into text pieces that are safe to send.
//!
//! A byte-level BPE token can end in the middle of a multi-byte UTF-8 character
//! (a Chinese character is three bytes and often two tokens). Sending each token's
//! text as decoded would put U+FFFD into the stream, so incomplete tails are held
//! back until the character is complete (the idea of candle's
//! `TokenOutputStream`, done on bytes rather than by re-decoding the whole text).

/// Accumulates bytes and releases the longest complete UTF-8 prefix.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// A stream with nothing held back.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes`; returns the text that is now complete, if any. Bytes that
    /// can never become valid UTF-8 are released as U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> Option<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Checked by from_utf8 just above.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        Some(len) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + len);
                        }
                    }
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// Releases whatever is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_split_across_tokens_is_never_split_in_output() {
        let text = "中国的首都是北京。大语言模型🚀";
        let bytes = text.as_bytes();
        // Feed one byte at a time: the worst possible tokenisation.
        let mut s = Utf8Stream::new();
        let mut pieces = Vec::new();
        for b in bytes {
            if let Some(p) = s.push(std::slice::from_ref(b)) {
                pieces.push(p);
            }
        }
        assert!(s.finish().is_none());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces.len(), text.chars().count());
    }

    #[test]
    fn uneven_splits_reassemble() {
        let text = "Zürich 北京 ß";
        let bytes = text.as_bytes();
        for cut in 1..bytes.len() {
            let mut s = Utf8Stream::new();
            let mut out = String::new();
            out.extend(s.push(&bytes[..cut]));
            out.extend(s.push(&bytes[cut..]));
            out.extend(s.finish());
            assert_eq!(out, text, "cut at {cut}");
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_and_stream_continues() {
        let mut s = Utf8Stream::new();
        assert_eq!(s.push(&[b'a', 0xFF, b'b']).as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(s.push(&[0xE4, 0xB8]), None);
        assert_eq!(s.finish().as_deref(), Some("\u{FFFD}"));
    }
}
