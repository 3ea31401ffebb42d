//! The gateway's log, masked: every formatted log event passes through the
//! recording masker (detector rules in every encoding, see
//! [`Masker::mask_text`]) on its way to stderr.
//!
//! Logs carry what the traffic put in request paths, host names, finding
//! locations and error messages, in text or JSON (where a key may appear
//! JSON-escaped). Masking each field where it is logged would leave the
//! next field someone adds unmasked; masking the formatted line leaves
//! nothing out. The masker is installed once the detector is built
//! ([`install`]); lines logged before (start-up, before any traffic) pass
//! as they are.

use std::{
    io::{self, Write},
    sync::Arc,
};

use arc_swap::ArcSwapOption;
use tracing_subscriber::fmt::MakeWriter;

use super::Masker;

/// The masker of log lines, once installed. Process-wide like the tracing
/// subscriber it serves.
static LOG_MASKER: ArcSwapOption<Masker> = ArcSwapOption::const_empty();

/// Masks every log line written from now on with `masker`.
pub fn install(masker: Arc<Masker>) {
    LOG_MASKER.store(Some(masker));
}

/// A [`MakeWriter`] for `tracing_subscriber::fmt`: stderr, each event
/// masked with the installed masker.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaskedStderr;

impl<'a> MakeWriter<'a> for MaskedStderr {
    type Writer = MaskedWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        MaskedWriter::new(io::stderr())
    }
}

/// Masks what is written to it before passing it on. The fmt subscriber
/// writes each formatted event with one `write_all`, so each `write` holds
/// whole events and a key is never split between two of them.
#[derive(Debug)]
pub struct MaskedWriter<W> {
    inner: W,
    /// A masker of its own rather than the installed one (tests).
    masker: Option<Arc<Masker>>,
}

impl<W: Write> MaskedWriter<W> {
    /// Writes to `inner`, masked with the installed masker.
    pub fn new(inner: W) -> Self {
        Self { inner, masker: None }
    }

    /// Writes to `inner`, masked with `masker`.
    pub fn with_masker(inner: W, masker: Arc<Masker>) -> Self {
        Self { inner, masker: Some(masker) }
    }
}

impl<W: Write> Write for MaskedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let installed = LOG_MASKER.load();
        match self.masker.as_ref().or(installed.as_ref()) {
            Some(masker) => {
                let (masked, _) = masker.mask_bytes(buf);
                self.inner.write_all(&masked)?;
            }
            None => self.inner.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
