//! Base64, the way traffic uses it: strict streaming decoding for framings
//! that declare it (gRPC-web text, `Content-Transfer-Encoding: base64`) and
//! lenient discovery of base64 runs inside text (header values, JSON
//! strings, form fields) that may hide a key.
//!
//! Both alphabets are accepted at once (standard `+/` and URL-safe `-_`),
//! padded or not. A run is a maximal stretch of alphabet characters (line
//! breaks inside it are skipped, as MIME wraps base64 at 76 characters) of at
//! least [`MIN_RUN`] characters; it is decoded from its first character, so
//! `data:…;base64,` prefixes, `Basic ` and JSON quotes delimit it naturally.

/// Shortest run worth decoding: 20 characters are 15 bytes, shorter than
/// any key a rule finds.
pub(crate) const MIN_RUN: usize = 20;

/// The 6-bit value of a base64 character of either alphabet.
pub(crate) fn sextet(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    }
}

/// Accumulates sextets and produces bytes.
#[derive(Debug, Default, Clone)]
pub(crate) struct Quads {
    acc: u32,
    n: u8,
}

impl Quads {
    /// Adds one sextet; appends a completed group's bytes to `out`.
    pub(crate) fn push(&mut self, v: u8, out: &mut Vec<u8>) {
        self.acc = self.acc << 6 | u32::from(v);
        self.n += 1;
        if self.n == 4 {
            out.extend_from_slice(&[(self.acc >> 16) as u8, (self.acc >> 8) as u8, self.acc as u8]);
            self.acc = 0;
            self.n = 0;
        }
    }

    /// Ends a group early (padding or end of data): appends the whole bytes
    /// of a partial group. `false` if a single dangling character is left,
    /// which no encoder produces.
    pub(crate) fn flush(&mut self, out: &mut Vec<u8>) -> bool {
        let ok = self.n != 1;
        match self.n {
            2 => out.push((self.acc >> 4) as u8),
            3 => out.extend_from_slice(&[(self.acc >> 10) as u8, (self.acc >> 2) as u8]),
            _ => {}
        }
        self.acc = 0;
        self.n = 0;
        ok
    }

    /// Characters of the current partial group.
    pub(crate) fn pending(&self) -> u8 {
        self.n
    }
}

/// Streaming decoder for data declared to be base64. Whitespace is skipped;
/// padding may end a group anywhere (gRPC-web text concatenates separately
/// padded chunks); any other byte is an error.
#[derive(Debug, Default)]
pub(crate) struct StrictDecoder {
    quads: Quads,
    /// `=` seen in the current group.
    padding: bool,
}

impl StrictDecoder {
    /// Decodes `data`, appending to `out`; `Err` names the first bad byte.
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        for &b in data {
            if b.is_ascii_whitespace() {
                continue;
            }
            if b == b'=' {
                if !self.padding {
                    if self.quads.pending() < 2 {
                        return Err("padding in the wrong place".into());
                    }
                    self.padding = true;
                    self.quads.flush(out);
                }
                continue;
            }
            let Some(v) = sextet(b) else {
                return Err(format!("byte 0x{b:02x} is not base64"));
            };
            self.padding = false;
            self.quads.push(v, out);
        }
        Ok(())
    }

    /// Ends the data; `Err` when a lone character dangles.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if self.quads.flush(out) {
            Ok(())
        } else {
            Err("truncated base64 data".into())
        }
    }
}

/// Finds base64 runs in a buffer: `(start, end)` byte ranges, `end`
/// including trailing padding.
pub(crate) fn runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    let mut chars = 0usize;
    for (i, &b) in data.iter().enumerate() {
        if sextet(b).is_some() {
            if start.is_none() {
                start = Some(i);
                chars = 0;
            }
            chars += 1;
        } else if (b == b'\r' || b == b'\n') && start.is_some() {
            // Wrapped base64 continues on the next line.
        } else if let Some(s) = start.take() {
            if chars >= MIN_RUN {
                let mut end = i;
                while end < data.len() && data[end] == b'=' && end - i < 2 {
                    end += 1;
                }
                out.push((s, end));
            }
        }
    }
    if let Some(s) = start {
        if chars >= MIN_RUN {
            out.push((s, data.len()));
        }
    }
    out
}

/// Decodes a run leniently from its `skip`-th alphabet character on
/// (`skip` 0 to 3 tries the other alignments of a run that does not start
/// where its base64 does).
pub(crate) fn decode_run(run: &[u8], skip: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(run.len() / 4 * 3 + 3);
    let mut quads = Quads::default();
    let mut skipped = 0;
    for &b in run {
        let Some(v) = sextet(b) else { continue };
        if skipped < skip {
            skipped += 1;
            continue;
        }
        quads.push(v, &mut out);
    }
    quads.flush(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    #[test]
    fn strict_decoder_takes_concatenated_padded_chunks() {
        let e = base64::engine::general_purpose::STANDARD;
        let text = format!("{}{}\r\n{}", e.encode(b"ab"), e.encode(b"cde"), e.encode(b"fghi"));
        let mut out = Vec::new();
        let mut d = StrictDecoder::default();
        for c in text.as_bytes().chunks(1) {
            d.feed(c, &mut out).unwrap();
        }
        d.finish(&mut out).unwrap();
        assert_eq!(out, b"abcdefghi");
        assert!(StrictDecoder::default().feed(b"ab!c", &mut Vec::new()).is_err());
        let mut d = StrictDecoder::default();
        d.feed(b"abcde", &mut out).unwrap();
        assert!(d.finish(&mut out).is_err());
    }

    #[test]
    fn runs_are_found_and_decoded_in_both_alphabets() {
        let payload = b"\xfb\xff some bytes that encode to + and / and more";
        let std = base64::engine::general_purpose::STANDARD.encode(payload);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
        for enc in [std, url] {
            let text = format!("x: \"{enc}\", y");
            let found = runs(text.as_bytes());
            assert_eq!(found.len(), 1, "{found:?}");
            let (s, e) = found[0];
            assert_eq!(decode_run(&text.as_bytes()[s..e], 0), payload);
        }
        let shifted = format!("Q{}", base64::engine::general_purpose::STANDARD.encode(payload));
        assert_eq!(decode_run(shifted.as_bytes(), 1), payload);
    }
}
