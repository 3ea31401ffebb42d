//! The globs of one selector (`host: ["*.a.com", "b.com"]`), compiled once
//! and matched without allocating.
//!
//! globset parses each glob and translates it to a regular expression; all
//! of a selector's expressions then become one dense DFA. A dense DFA is
//! fully built ahead of time, so a match is a walk over a table: unlike the
//! `regex` crate's lazy DFA it never allocates states while searching, which
//! is what lets [`super::Policy::evaluate`] promise zero allocations.

use globset::GlobBuilder;
use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::{util::syntax, Anchored, Input};

/// Upper bound on one selector's DFA; globs are small, so a bigger one is
/// a pathological pattern rather than a policy worth the memory.
const DFA_SIZE_LIMIT: usize = 4 << 20;

/// Characters that make a glob more than a literal.
const GLOB_META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

/// Why a selector's globs did not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GlobError {
    /// Index of the offending glob, when one is to blame.
    pub(super) index: Option<usize>,
    pub(super) message: String,
}

/// One selector's globs: matches when any of them matches the whole value.
/// `*` and `?` never match `/`; `**` does.
#[derive(Debug, Clone)]
pub(super) struct GlobList {
    sources: Vec<String>,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    /// Only literal patterns: plain comparisons, no DFA.
    Literals { case_insensitive: bool },
    Dfa {
        dfa: Box<dense::DFA<Vec<u32>>>,
        /// One per glob: a value no glob admits cannot match, and most
        /// values are rejected so, without walking the DFA.
        affixes: Vec<Affixes>,
        case_insensitive: bool,
    },
}

/// The literal text a glob's matches must start and end with.
#[derive(Debug, Clone)]
struct Affixes {
    prefix: String,
    suffix: String,
}

impl Affixes {
    /// The literal runs before the first and after the last glob
    /// metacharacter. Slashes next to the metacharacters are left out:
    /// `**/a` matches `a` and `a/**/b` matches `a/b`, so those slashes are
    /// optional.
    fn of(glob: &str) -> Affixes {
        let first = glob.find(GLOB_META).unwrap_or(glob.len());
        let last = glob.rfind(GLOB_META).map_or(glob.len(), |i| i + 1);
        let prefix = glob[..first].trim_end_matches('/');
        let suffix = glob.get(last..).unwrap_or("").trim_start_matches('/');
        Affixes { prefix: prefix.to_owned(), suffix: suffix.to_owned() }
    }

    fn admits(&self, value: &str, case_insensitive: bool) -> bool {
        let (v, p, s) = (value.as_bytes(), self.prefix.as_bytes(), self.suffix.as_bytes());
        if v.len() < p.len() + s.len() {
            return false;
        }
        let (head, tail) = (&v[..p.len()], &v[v.len() - s.len()..]);
        if case_insensitive {
            head.eq_ignore_ascii_case(p) && tail.eq_ignore_ascii_case(s)
        } else {
            head == p && tail == s
        }
    }
}

impl GlobList {
    /// Compiles `sources`. With `case_insensitive`, ASCII letters match
    /// either case.
    pub(super) fn new(sources: Vec<String>, case_insensitive: bool) -> Result<GlobList, GlobError> {
        GlobList::build(sources, case_insensitive, true)
    }

    /// Compiles globs over names that have no `/` structure (database
    /// names, SQL identifiers): `*` and `?` match any character, `/`
    /// included, so a quoted identifier holding a `/` cannot slip past.
    pub(super) fn names(sources: Vec<String>, case_insensitive: bool) -> Result<GlobList, GlobError> {
        GlobList::build(sources, case_insensitive, false)
    }

    fn build(sources: Vec<String>, case_insensitive: bool, literal_separator: bool) -> Result<GlobList, GlobError> {
        let mut regexes = Vec::with_capacity(sources.len());
        for (index, src) in sources.iter().enumerate() {
            if src.is_empty() {
                return Err(GlobError { index: Some(index), message: "empty pattern".into() });
            }
            let glob = GlobBuilder::new(src)
                .literal_separator(literal_separator)
                .backslash_escape(true)
                .case_insensitive(case_insensitive)
                .build()
                .map_err(|e| GlobError { index: Some(index), message: format!("bad glob `{src}`: {}", e.kind()) })?;
            regexes.push(glob.regex().to_owned());
        }
        if sources.iter().all(|s| !s.contains(GLOB_META)) {
            return Ok(GlobList { sources, matcher: Matcher::Literals { case_insensitive } });
        }
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .start_kind(StartKind::Anchored)
                    .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                    .determinize_size_limit(Some(DFA_SIZE_LIMIT)),
            )
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .thompson(thompson::Config::new().utf8(false))
            .build_many(&regexes)
            .map_err(|e| GlobError { index: None, message: format!("patterns too complex to compile: {e}") })?;
        let affixes = sources.iter().map(|s| Affixes::of(s)).collect();
        Ok(GlobList { sources, matcher: Matcher::Dfa { dfa: Box::new(dfa), affixes, case_insensitive } })
    }

    /// Whether any glob matches all of `value`. Never allocates.
    pub(super) fn is_match(&self, value: &str) -> bool {
        match &self.matcher {
            Matcher::Literals { case_insensitive: false } => self.sources.iter().any(|s| s == value),
            Matcher::Literals { case_insensitive: true } => self.sources.iter().any(|s| s.eq_ignore_ascii_case(value)),
            Matcher::Dfa { dfa, affixes, case_insensitive } => {
                if !affixes.iter().any(|a| a.admits(value, *case_insensitive)) {
                    return false;
                }
                let input = Input::new(value).anchored(Anchored::Yes).earliest(true);
                // Errors only come from quit bytes or Unicode word boundaries,
                // neither of which glob regexes use.
                matches!(dfa.try_search_fwd(&input), Ok(Some(_)))
            }
        }
    }

    /// The globs as written (after normalisation such as lowercasing).
    pub(super) fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Heap bytes held by the compiled form.
    pub(super) fn memory_usage(&self) -> usize {
        let sources: usize = self.sources.iter().map(String::capacity).sum();
        match &self.matcher {
            Matcher::Literals { .. } => sources,
            Matcher::Dfa { dfa, affixes, .. } => {
                sources
                    + dfa.memory_usage()
                    + affixes.iter().map(|a| a.prefix.capacity() + a.suffix.capacity()).sum::<usize>()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(globs: &[&str], ci: bool) -> GlobList {
        GlobList::new(globs.iter().map(|s| (*s).to_owned()).collect(), ci).unwrap()
    }

    #[test]
    fn star_stays_in_a_segment_and_double_star_crosses() {
        let l = list(&["spiffe://ci.example/repo/acme/*"], false);
        assert!(l.is_match("spiffe://ci.example/repo/acme/web"));
        assert!(!l.is_match("spiffe://ci.example/repo/acme/web/x"));
        assert!(!l.is_match("spiffe://ci.example/repo/other/web"));
        let l = list(&["/v1/admin/**"], false);
        assert!(l.is_match("/v1/admin/users"));
        assert!(l.is_match("/v1/admin/users/7"));
        assert!(!l.is_match("/v1/public"));
    }

    #[test]
    fn any_of_several_and_whole_value_only() {
        let l = list(&["*.cursor.sh", "api.internal"], true);
        assert!(l.is_match("api2.cursor.sh"));
        assert!(l.is_match("a.b.cursor.sh"));
        assert!(l.is_match("API.INTERNAL"));
        assert!(l.is_match("Repo.Cursor.SH"));
        assert!(!l.is_match("cursor.sh"));
        assert!(!l.is_match("api.internal.evil.com"));
        assert!(!l.is_match("xapi.internal"));
    }

    #[test]
    fn name_globs_cross_every_character() {
        let l = GlobList::names(vec!["sec*".into(), "a?c".into()], false).unwrap();
        assert!(l.is_match("sec/ret"));
        assert!(l.is_match("secrets"));
        assert!(l.is_match("a/c"));
        assert!(!l.is_match("Secrets"));
    }

    #[test]
    fn literals_respect_case_setting() {
        let l = list(&["POST"], false);
        assert!(l.is_match("POST"));
        assert!(!l.is_match("post"));
        let l = list(&["api.internal"], true);
        assert!(l.is_match("Api.Internal"));
    }

    #[test]
    fn alternation_classes_and_escapes() {
        let l = list(&["acme.{billing,payments}.v1.*/Get*"], false);
        assert!(l.is_match("acme.billing.v1.BillingService/GetInvoice"));
        assert!(!l.is_match("acme.users.v1.UserService/GetUser"));
        let l = list(&["build-[0-9]", "lit\\*"], false);
        assert!(l.is_match("build-7"));
        assert!(l.is_match("lit*"));
        assert!(!l.is_match("litx"));
    }

    /// The DFA (with its affix filter) agrees with globset's own matcher.
    #[test]
    fn agrees_with_globset() {
        let globs = [
            "**/foo",
            "a/**/b",
            "foo/**",
            "**",
            "*",
            "a*ba",
            "*.svc1.internal",
            "spiffe://td/repo/*/wf/*",
            "/v1/admin/**",
            "{x,y}z/*",
            "[ab]c?",
            "lit\\*x",
            "a/**",
            "**/",
            "*/*",
            "x**y",
        ];
        let values = [
            "",
            "foo",
            "x/foo",
            "x/y/foo",
            "foo/bar",
            "foo/",
            "a/b",
            "a/x/b",
            "a/x/y/b",
            "ab",
            "aba",
            "abba",
            "acba",
            "s.svc1.internal",
            "a.b.svc1.internal",
            "svc1.internal",
            "spiffe://td/repo/r/wf/w",
            "spiffe://td/repo/r/x/wf/w",
            "/v1/admin",
            "/v1/admin/",
            "/v1/admin/u/7",
            "xz/1",
            "yz/1/2",
            "ac!",
            "bcd",
            "lit*x",
            "litax",
            "a/",
            "a",
            "/",
            "x/y",
            "xy",
            "x/y/y",
            "xay",
        ];
        for g in globs {
            let truth =
                GlobBuilder::new(g).literal_separator(true).backslash_escape(true).build().unwrap().compile_matcher();
            let ours = list(&[g], false);
            for v in values {
                assert_eq!(ours.is_match(v), truth.is_match(v), "glob {g:?} value {v:?}");
            }
        }
    }

    #[test]
    fn bad_and_empty_globs_name_their_index() {
        let e = GlobList::new(vec!["ok".into(), "/usr/[bin".into()], false).unwrap_err();
        assert_eq!(e.index, Some(1));
        assert!(e.message.contains("bad glob"), "{}", e.message);
        let e = GlobList::new(vec!["".into()], false).unwrap_err();
        assert_eq!(e.index, Some(0));
    }
}
