//! SQL texts a session already found clean: no key in them, and how the
//! recording shows them (masked). A client of the extended query protocol
//! sends the same Parse text for every execution (pgbench `-M extended`,
//! most drivers without named statements); remembered, that text is not
//! scanned and masked again.
//!
//! Why this is sound: the detector's findings in a text are a function of
//! the compiled detector and the text's bytes alone (Hyperscan and the
//! confirming expressions keep no state between scans), and the recording
//! masker's output a function of the masker and the text. An entry is used
//! only for the exact same text under the very same detector and masker
//! (`Arc` identity; both are held here, so their addresses cannot be reused
//! by a later one); any other detector or masker (a reload) empties the
//! memory first. A text in which the detector found anything is never
//! remembered, so it is judged every time. Nothing about the policy is
//! remembered: every statement is still classified, judged at the gate and
//! recorded.

use std::{collections::HashMap, sync::Arc};

/// Texts remembered per session at most (then the memory starts over).
const MAX_TEXTS: usize = 256;
/// Longest text remembered, in bytes (longer ones are rare and big).
pub const MAX_TEXT: usize = 4096;

/// The clean texts of one session, under detector `D` and masker `M`.
#[derive(Debug)]
pub struct CleanTexts<D, M> {
    /// What the texts were found clean and masked with.
    under: Option<(Arc<D>, Arc<M>)>,
    /// Text -> its recorded form (`None`: not masked yet, as when the
    /// session is not recorded).
    texts: HashMap<Box<str>, Option<Arc<str>>>,
}

impl<D, M> Default for CleanTexts<D, M> {
    fn default() -> Self {
        CleanTexts { under: None, texts: HashMap::new() }
    }
}

/// What is known of a text.
#[derive(Debug, PartialEq, Eq)]
pub enum Known {
    /// Never found clean under this detector and masker: scan it.
    Unknown,
    /// Clean; its recorded form, when it was masked before.
    Clean(Option<Arc<str>>),
}

impl<D, M> CleanTexts<D, M> {
    /// What is known of `text` under `detector` and `masker`.
    pub fn get(&mut self, detector: &Arc<D>, masker: &Arc<M>, text: &str) -> Known {
        if !self.same(detector, masker) {
            return Known::Unknown;
        }
        match self.texts.get(text) {
            Some(recorded) => Known::Clean(recorded.clone()),
            None => Known::Unknown,
        }
    }

    /// Remembers that `detector` found nothing in `text`, and (`Some`) how
    /// `masker` shows it. Call it only for a scan of the whole text that
    /// found nothing.
    pub fn remember(&mut self, detector: &Arc<D>, masker: &Arc<M>, text: &str, recorded: Option<Arc<str>>) {
        if text.len() > MAX_TEXT {
            return;
        }
        if !self.same(detector, masker) {
            self.texts.clear();
            self.under = Some((Arc::clone(detector), Arc::clone(masker)));
        }
        if self.texts.len() >= MAX_TEXTS && !self.texts.contains_key(text) {
            self.texts.clear();
        }
        self.texts.insert(text.into(), recorded);
    }

    fn same(&self, detector: &Arc<D>, masker: &Arc<M>) -> bool {
        self.under.as_ref().is_some_and(|(d, m)| Arc::ptr_eq(d, detector) && Arc::ptr_eq(m, masker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_under_the_same_detector_and_masker_is_known() {
        let (d, m) = (Arc::new(1u8), Arc::new(2u8));
        let mut clean = CleanTexts::default();
        let text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        assert_eq!(clean.get(&d, &m, text), Known::Unknown);
        clean.remember(&d, &m, text, None);
        assert_eq!(clean.get(&d, &m, text), Known::Clean(None));
        let shown: Arc<str> = Arc::from(text);
        clean.remember(&d, &m, text, Some(Arc::clone(&shown)));
        assert_eq!(clean.get(&d, &m, text), Known::Clean(Some(shown)));
        // Not another text, however close.
        assert_eq!(clean.get(&d, &m, "SELECT abalance FROM pgbench_accounts WHERE aid = $2"), Known::Unknown);
        assert_eq!(clean.get(&d, &m, &format!("{text} ")), Known::Unknown);
    }

    #[test]
    fn another_detector_or_masker_forgets_everything() {
        let (d, m) = (Arc::new(1u8), Arc::new(2u8));
        let mut clean = CleanTexts::default();
        clean.remember(&d, &m, "SELECT 1", None);
        // Equal contents, other objects: a reload compiles new ones.
        let (d2, m2) = (Arc::new(1u8), Arc::new(2u8));
        assert_eq!(clean.get(&d2, &m, "SELECT 1"), Known::Unknown);
        assert_eq!(clean.get(&d, &m2, "SELECT 1"), Known::Unknown);
        clean.remember(&d2, &m, "SELECT 2", None);
        assert_eq!(clean.get(&d2, &m, "SELECT 1"), Known::Unknown, "the old detector's texts are gone");
        assert_eq!(clean.get(&d, &m, "SELECT 1"), Known::Unknown, "and stay gone under the old one");
        assert_eq!(clean.get(&d2, &m, "SELECT 2"), Known::Clean(None));
    }

    #[test]
    fn long_texts_are_not_remembered_and_the_memory_is_bounded() {
        let (d, m) = (Arc::new(1u8), Arc::new(2u8));
        let mut clean = CleanTexts::default();
        let long = "x".repeat(MAX_TEXT + 1);
        clean.remember(&d, &m, &long, None);
        assert_eq!(clean.get(&d, &m, &long), Known::Unknown);
        for i in 0..=MAX_TEXTS {
            clean.remember(&d, &m, &format!("SELECT {i}"), None);
        }
        assert!(clean.texts.len() <= MAX_TEXTS);
        assert_eq!(clean.get(&d, &m, &format!("SELECT {MAX_TEXTS}")), Known::Clean(None));
    }
}
