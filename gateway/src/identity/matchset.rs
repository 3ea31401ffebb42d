//! All globs of a mapping file, grouped by the attribute they test and
//! compiled into one `GlobSet` per attribute: a process's attributes are
//! matched once per resolution, whatever the number of rules, and each rule
//! then only looks up precomputed hits by pattern id.

use std::collections::HashMap;

use globset::{Candidate, GlobBuilder, GlobSet, GlobSetBuilder};

use super::attest::Attested;

/// Attributes that globs test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Exe,
    Cgroup,
    Container,
    Comm,
    /// Ancestors' executables (`parent_exe` and `ancestor_exe`).
    Ancestor,
    /// Container name, from the runtime.
    ContainerName,
    /// Container image, from the runtime.
    ContainerImage,
}

const FIELDS: usize = 7;

/// A pattern of a rule: its id in its field's set.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    pub(crate) id: usize,
    pub(crate) source: String,
}

struct SetBuilder {
    builder: GlobSetBuilder,
    ids: HashMap<String, usize>,
}

impl Default for SetBuilder {
    fn default() -> Self {
        SetBuilder { builder: GlobSetBuilder::new(), ids: HashMap::new() }
    }
}

impl SetBuilder {
    fn add(&mut self, source: String) -> Result<Pattern, String> {
        if let Some(&id) = self.ids.get(&source) {
            return Ok(Pattern { id, source });
        }
        let glob = GlobBuilder::new(&source)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("bad glob `{source}`: {}", e.kind()))?;
        self.builder.add(glob);
        let id = self.ids.len();
        self.ids.insert(source.clone(), id);
        Ok(Pattern { id, source })
    }

    fn build(self) -> Result<(GlobSet, usize), String> {
        let n = self.ids.len();
        self.builder.build().map(|s| (s, n)).map_err(|e| e.to_string())
    }
}

/// Collects patterns while rules compile.
#[derive(Default)]
pub(crate) struct SetsBuilder {
    fields: [SetBuilder; FIELDS],
    env: HashMap<String, SetBuilder>,
}

impl SetsBuilder {
    /// Registers a glob for a field (deduplicated).
    pub(crate) fn add(&mut self, field: Field, source: String) -> Result<Pattern, String> {
        self.fields[field as usize].add(source)
    }

    /// Registers a glob for an environment variable's value.
    pub(crate) fn add_env(&mut self, name: &str, source: String) -> Result<Pattern, String> {
        self.env.entry(name.to_owned()).or_default().add(source)
    }

    /// Compiles every set.
    pub(crate) fn build(self) -> Result<Sets, String> {
        let mut fields = Vec::with_capacity(FIELDS);
        for b in self.fields {
            fields.push(b.build()?);
        }
        let mut env = Vec::with_capacity(self.env.len());
        for (name, b) in self.env {
            let (set, n) = b.build()?;
            env.push((name, set, n));
        }
        Ok(Sets { fields, env })
    }
}

/// The compiled sets of a mapping file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sets {
    fields: Vec<(GlobSet, usize)>,
    env: Vec<(String, GlobSet, usize)>,
}

/// Which patterns a process's attributes hit.
pub(crate) struct Hits {
    fields: Vec<Vec<bool>>,
    /// For ancestors: hit by the parent / by any ancestor / by a root-owned one.
    parent: Vec<bool>,
    ancestor_trusted: Vec<bool>,
    env: Vec<Vec<bool>>,
}

impl Sets {
    /// Matches every set against `a` once.
    pub(crate) fn evaluate(&self, a: &Attested) -> Hits {
        let mut scratch = Vec::new();
        let mut fields = Vec::with_capacity(FIELDS);
        let mut parent = Vec::new();
        let mut ancestor_trusted = Vec::new();
        for (i, (set, n)) in self.fields.iter().enumerate() {
            let mut hits = vec![false; *n];
            if *n > 0 {
                let value = match i {
                    x if x == Field::Exe as usize => Some(a.exe.path.as_str()),
                    x if x == Field::Cgroup as usize => a.cgroup.as_deref(),
                    x if x == Field::Container as usize => a.container.as_ref().map(|c| c.id.as_str()),
                    x if x == Field::Comm as usize => Some(a.comm.as_str()),
                    x if x == Field::ContainerName as usize => a.container.as_ref().and_then(|c| c.name.as_deref()),
                    x if x == Field::ContainerImage as usize => a.container.as_ref().and_then(|c| c.image.as_deref()),
                    _ => None,
                };
                if let Some(v) = value {
                    mark(set, v, &mut hits, &mut scratch);
                }
                if i == Field::Ancestor as usize {
                    parent = vec![false; *n];
                    ancestor_trusted = vec![false; *n];
                    for (depth, anc) in a.ancestors.iter().enumerate() {
                        let Some(exe) = &anc.exe else { continue };
                        set.matches_candidate_into(&Candidate::new(exe.path.as_str()), &mut scratch);
                        for &id in &scratch {
                            hits[id] = true;
                            if depth == 0 {
                                parent[id] = true;
                            }
                            if exe.root_owned {
                                ancestor_trusted[id] = true;
                            }
                        }
                    }
                }
            }
            fields.push(hits);
        }
        let mut env = Vec::with_capacity(self.env.len());
        for (name, set, n) in &self.env {
            let mut hits = vec![false; *n];
            if let Some(v) = a.env.get(name) {
                mark(set, v, &mut hits, &mut scratch);
            }
            env.push(hits);
        }
        Hits { fields, parent, ancestor_trusted, env }
    }

    /// Index of an env variable's set, for rules to look hits up without
    /// hashing strings per rule.
    pub(crate) fn env_index(&self, name: &str) -> Option<usize> {
        self.env.iter().position(|(n, _, _)| n == name)
    }
}

fn mark(set: &GlobSet, value: &str, hits: &mut [bool], scratch: &mut Vec<usize>) {
    set.matches_candidate_into(&Candidate::new(value), scratch);
    for &id in scratch.iter() {
        hits[id] = true;
    }
}

impl Hits {
    /// Any of `pats` hit on `field`.
    pub(crate) fn any(&self, field: Field, pats: &[Pattern]) -> bool {
        let hits = &self.fields[field as usize];
        pats.iter().any(|p| hits.get(p.id).copied().unwrap_or(false))
    }

    /// Any of `pats` hit the parent's executable.
    pub(crate) fn parent(&self, pats: &[Pattern]) -> bool {
        pats.iter().any(|p| self.parent.get(p.id).copied().unwrap_or(false))
    }

    /// Any of `pats` hit a root-owned ancestor executable.
    pub(crate) fn ancestor_trusted(&self, pats: &[Pattern]) -> bool {
        pats.iter().any(|p| self.ancestor_trusted.get(p.id).copied().unwrap_or(false))
    }

    /// Any of `pats` hit env set `set`.
    pub(crate) fn env(&self, set: Option<usize>, pats: &[Pattern]) -> bool {
        let Some(hits) = set.and_then(|s| self.env.get(s)) else { return false };
        pats.iter().any(|p| hits.get(p.id).copied().unwrap_or(false))
    }
}
