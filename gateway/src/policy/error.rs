//! Policy file errors, each with the line and column of the YAML node at
//! fault.
//!
//! serde_yaml_ng reports positions only for errors raised while it parses.
//! Validation happens later, on typed values, so [`Locator`] asks the parser
//! again: it walks the document to the failing node's path (`rules[3].match.
//! destination.port[1]`) and raises an error there, which serde_yaml_ng
//! stamps with that node's position. This is exact for any YAML style (block,
//! flow, quoted), unlike scanning the text for keys.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}: {message}", self.location())]
pub struct PolicyError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line; 0 when the error concerns the whole file (I/O).
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// Index of the rule concerned, if any.
    pub rule: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl PolicyError {
    /// An error about the whole file (it cannot be read, ...).
    pub(super) fn file(file: PathBuf, message: String) -> PolicyError {
        PolicyError { file, line: 0, column: 0, rule: None, message }
    }

    fn location(&self) -> String {
        match (self.line, self.column) {
            (0, _) => self.file.display().to_string(),
            (l, 0) => format!("{}:{l}", self.file.display()),
            (l, c) => format!("{}:{l}:{c}", self.file.display()),
        }
    }
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    pub(super) fn key(k: &str) -> Seg {
        Seg::Key(k.to_owned())
    }
}

/// Converts serde_path_to_error's path (relative to a value) into segments.
pub(super) fn segments(path: &serde_path_to_error::Path) -> Vec<Seg> {
    let mut out = Vec::new();
    for seg in path.iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => out.push(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => out.push(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => out.push(Seg::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    out
}

/// Finds nodes of one document by path.
pub(super) struct Locator<'t> {
    text: &'t str,
}

/// Raised at the target node; nothing else produces it.
const MARK: &str = "\u{0}policy-locate";

impl<'t> Locator<'t> {
    pub(super) fn new(text: &'t str) -> Locator<'t> {
        Locator { text }
    }

    /// Line and column of the node at `path` (of its key when `at_key`),
    /// falling back to the closest enclosing node that exists, then 1:1.
    pub(super) fn locate(&self, path: &[Seg], at_key: bool) -> (usize, usize) {
        if let Some(pos) = self.find(path, at_key) {
            return pos;
        }
        (0..path.len()).rev().find_map(|n| self.find(&path[..n], false)).unwrap_or((1, 1))
    }

    fn find(&self, path: &[Seg], at_key: bool) -> Option<(usize, usize)> {
        let de = serde_yaml_ng::Deserializer::from_str(self.text);
        match (Probe { path, at_key }).deserialize(de) {
            // serde_yaml_ng prefixes the message with the path.
            Err(e) if e.to_string().contains(MARK) => e.location().map(|l| (l.line(), l.column())),
            _ => None,
        }
    }
}

/// Walks to `path` and fails there.
struct Probe<'p> {
    path: &'p [Seg],
    at_key: bool,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Probe<'_> {
    fn leaf<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(MARK))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(target), rest)) = self.path.split_first() else {
            return self.leaf();
        };
        let mut i = 0;
        loop {
            if i == *target {
                seq.next_element_seed(Probe { path: rest, at_key: self.at_key })?;
                return Ok(());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(target), rest)) = self.path.split_first() else {
            return self.leaf();
        };
        let fail_at_key = self.at_key && rest.is_empty();
        while let Some(found) = map.next_key_seed(KeyProbe { target, fail: fail_at_key })? {
            if found {
                return map.next_value_seed(Probe { path: rest, at_key: self.at_key });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Reads a mapping key: whether it is `target`, failing on it if `fail`.
struct KeyProbe<'p> {
    target: &'p str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl KeyProbe<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        match key == self.target {
            true if self.fail => Err(E::custom(MARK)),
            found => Ok(found),
        }
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// serde_yaml_ng appends "at line L column C" to messages; errors print the
/// location in front instead.
pub(super) fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, path: &[Seg], at_key: bool) -> (usize, usize) {
        Locator::new(text).locate(path, at_key)
    }

    #[test]
    fn finds_values_keys_and_list_elements_in_block_and_flow_style() {
        let text = "a: 1\nrules:\n  - name: x\n    port: [80, 70000]\n  - { name: y, port: 5 }\n";
        let p = |s: &[Seg]| s.to_vec();
        assert_eq!(at(text, &p(&[Seg::key("a")]), false), (1, 4));
        assert_eq!(at(text, &p(&[Seg::key("a")]), true), (1, 1));
        assert_eq!(at(text, &p(&[Seg::key("rules"), Seg::Index(0), Seg::key("port"), Seg::Index(1)]), false), (4, 16));
        assert_eq!(at(text, &p(&[Seg::key("rules"), Seg::Index(1), Seg::key("port")]), false), (5, 22));
        assert_eq!(at(text, &p(&[Seg::key("rules"), Seg::Index(1), Seg::key("name")]), true), (5, 7));
    }

    #[test]
    fn missing_nodes_fall_back_to_the_closest_parent() {
        let text = "rules:\n  - name: x\n    action: deny\n";
        let path = [Seg::key("rules"), Seg::Index(0), Seg::key("approval"), Seg::key("group")];
        assert_eq!(at(text, &path, false), (2, 5));
        assert_eq!(at(text, &[Seg::key("nope")], false), (1, 1));
    }

    #[test]
    fn quoted_scalars_point_at_the_quote() {
        let text = "host: \"[bad\"\n";
        assert_eq!(at(text, &[Seg::key("host")], false), (1, 7));
    }
}
