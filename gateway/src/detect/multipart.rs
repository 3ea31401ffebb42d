//! Incremental `multipart/form-data` parsing: each part's content is emitted
//! as `name=content` under location `multipart.<name>`.

use super::body::{Emit, MAX_NAME};

/// Part headers longer than this are skipped rather than buffered.
const MAX_HEADERS: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Preamble,
    AfterDelimiter,
    Headers,
    Body,
    Epilogue,
}

/// See the module documentation.
pub(crate) struct MultipartParser {
    /// `\r\n--boundary`.
    delimiter: Vec<u8>,
    state: State,
    buf: Vec<u8>,
}

impl MultipartParser {
    pub(crate) fn new(boundary: &str) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        // The first delimiter has no CRLF before it; pretend it has one.
        Self { delimiter, state: State::Preamble, buf: b"\r\n".to_vec() }
    }

    pub(crate) fn feed(&mut self, data: &[u8], sink: &mut impl Emit) {
        self.buf.extend_from_slice(data);
        loop {
            match self.state {
                State::Preamble => match find(&self.buf, &self.delimiter) {
                    Some(i) => {
                        self.buf.drain(..i + self.delimiter.len());
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        self.keep_tail();
                        return;
                    }
                },
                State::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return;
                    }
                    if self.buf.starts_with(b"--") {
                        self.state = State::Epilogue;
                        continue;
                    }
                    match find(&self.buf, b"\r\n") {
                        Some(i) => {
                            // What precedes CRLF is transport padding.
                            self.buf.drain(..i + 2);
                            self.state = State::Headers;
                        }
                        None if self.buf.len() > MAX_HEADERS => {
                            self.buf.clear();
                            self.state = State::Headers;
                        }
                        None => return,
                    }
                }
                State::Headers => {
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        find(&self.buf, b"\r\n\r\n").map(|i| (i, 4))
                    };
                    match end {
                        Some((i, sep)) => {
                            let name = part_name(&self.buf[..i]);
                            self.buf.drain(..i + sep);
                            self.start_part(name.as_deref(), sink);
                        }
                        None if self.buf.len() > MAX_HEADERS => {
                            self.buf.clear();
                            self.start_part(None, sink);
                        }
                        None => return,
                    }
                }
                State::Body => match find(&self.buf, &self.delimiter) {
                    Some(i) => {
                        sink.data(&self.buf[..i]);
                        self.buf.drain(..i + self.delimiter.len());
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        // All but what could be the start of a split delimiter.
                        let safe = self.buf.len().saturating_sub(self.delimiter.len() - 1);
                        sink.data(&self.buf[..safe]);
                        self.buf.drain(..safe);
                        return;
                    }
                },
                State::Epilogue => {
                    self.buf.clear();
                    return;
                }
            }
        }
    }

    pub(crate) fn finish(&mut self, sink: &mut impl Emit) {
        if self.state == State::Body {
            sink.data(&self.buf);
        }
        self.buf.clear();
    }

    fn start_part(&mut self, name: Option<&str>, sink: &mut impl Emit) {
        match name {
            Some(name) => {
                sink.begin(&format!("multipart.{name}"));
                // `name=` so assignment rules see the field name.
                sink.data(format!("{name}=").as_bytes());
            }
            None => sink.begin("multipart"),
        }
        self.state = State::Body;
    }

    fn keep_tail(&mut self) {
        let keep = self.delimiter.len() - 1;
        if self.buf.len() > keep {
            self.buf.drain(..self.buf.len() - keep);
        }
    }
}

/// The `name` parameter of `Content-Disposition`.
fn part_name(headers: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(headers);
    let line = text.lines().find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))?;
    line.split(';').skip(1).find_map(|param| {
        let (k, v) = param.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("name")).then(|| {
            let mut v = v.trim().trim_matches('"').to_string();
            // `truncate` would panic inside a multi-byte character.
            while v.len() > MAX_NAME {
                v.pop();
            }
            v
        })
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}
