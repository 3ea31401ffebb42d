//! The policy file as written: serde types for `version`, `rules` and
//! `defaults`, before validation. `docs/policy.md` is the reference.
//!
//! Rules and defaults are first read as untyped YAML values so that each one
//! is typed on its own: a mistake in one rule does not hide mistakes in the
//! others.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::decision::{CredentialUse, RecordLevel, StaticKeyAction, Uninspectable};
use super::facts::Protocol;

/// The top level of a policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSpec {
    pub(super) version: u32,
    /// `Option` so that an empty `rules:` (null) reads as no rules.
    #[serde(default)]
    pub(super) rules: Option<Vec<serde_yaml_ng::Value>>,
    pub(super) defaults: serde_yaml_ng::Value,
}

/// One entry of `rules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleSpec {
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default, rename = "match")]
    pub(super) selectors: MatchSpec,
    pub(super) action: ActionKind,
    #[serde(default)]
    pub(super) reason: Option<String>,
    #[serde(default)]
    pub(super) approval: Option<ApprovalSpecRaw>,
    #[serde(default)]
    pub(super) static_keys: Option<StaticKeyAction>,
    #[serde(default)]
    pub(super) credential: Option<CredentialUse>,
    #[serde(default)]
    pub(super) mask: Option<MaskSetting>,
    #[serde(default)]
    pub(super) record: Option<RecordLevel>,
    #[serde(default)]
    pub(super) uninspectable: Option<Uninspectable>,
}

/// `defaults`: the closing rule that decides when no rule matches, and the
/// values rules inherit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DefaultsSpec {
    pub(super) action: ActionKind,
    #[serde(default)]
    pub(super) reason: Option<String>,
    #[serde(default)]
    pub(super) static_keys: Option<StaticKeyAction>,
    #[serde(default)]
    pub(super) credential: Option<CredentialUse>,
    #[serde(default)]
    pub(super) mask: Option<MaskSetting>,
    #[serde(default)]
    pub(super) record: Option<RecordLevel>,
    #[serde(default)]
    pub(super) uninspectable: Option<Uninspectable>,
}

/// `action:` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ActionKind {
    Allow,
    Deny,
    RequireApproval,
}

/// `match:`: all given groups must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MatchSpec {
    #[serde(default)]
    pub(super) identity: Option<IdentitySpec>,
    #[serde(default)]
    pub(super) destination: Option<DestinationSpec>,
    #[serde(default)]
    pub(super) request: Option<RequestSpec>,
    #[serde(default)]
    pub(super) postgres: Option<PostgresSpec>,
}

/// `match.postgres`: a PostgreSQL session and its statements.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PostgresSpec {
    #[serde(default)]
    pub(super) database: Option<OneOrMany<String>>,
    #[serde(default)]
    pub(super) user: Option<OneOrMany<String>>,
    /// Statement kinds (`select`, `delete`, `copy`, `unknown`, ...).
    #[serde(default)]
    pub(super) kind: Option<OneOrMany<String>>,
    /// Matches when the statement may touch any of these relations.
    #[serde(default)]
    pub(super) relations: Option<OneOrMany<String>>,
    /// Matches when every relation the statement touches is one of these.
    #[serde(default)]
    pub(super) only_relations: Option<OneOrMany<String>>,
    /// `false`: an `UPDATE`/`DELETE` without `WHERE`; `true`: with one.
    #[serde(default, rename = "where")]
    pub(super) has_where: Option<bool>,
}

/// `match.identity`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IdentitySpec {
    #[serde(default)]
    pub(super) uri: Option<OneOrMany<String>>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, OneOrMany<String>>,
    #[serde(default)]
    pub(super) claims: BTreeMap<String, OneOrMany<String>>,
    #[serde(default)]
    pub(super) unmapped: Option<bool>,
}

/// `match.destination`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DestinationSpec {
    #[serde(default)]
    pub(super) host: Option<OneOrMany<String>>,
    /// Wide integers so that out-of-range ports are reported by validation
    /// (with every other error) rather than stopping the parse.
    #[serde(default)]
    pub(super) port: Option<OneOrMany<i64>>,
    /// Networks (`10.0.0.0/8`) or addresses, parsed by validation.
    #[serde(default)]
    pub(super) cidr: Option<OneOrMany<String>>,
    #[serde(default)]
    pub(super) protocol: Option<OneOrMany<Protocol>>,
}

/// `match.request`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RequestSpec {
    #[serde(default)]
    pub(super) method: Option<OneOrMany<String>>,
    #[serde(default)]
    pub(super) path: Option<OneOrMany<String>>,
    #[serde(default)]
    pub(super) rpc: Option<OneOrMany<String>>,
    /// Match `path` and `rpc` case-sensitively (default: ignoring ASCII case).
    #[serde(default)]
    pub(super) case_sensitive: Option<bool>,
    #[serde(default)]
    pub(super) headers: Option<HeadersSpec>,
}

/// `match.request.headers`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeadersSpec {
    #[serde(default)]
    pub(super) present: Option<OneOrMany<String>>,
    #[serde(default)]
    pub(super) absent: Option<OneOrMany<String>>,
}

/// `approval:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApprovalSpecRaw {
    pub(super) group: String,
    #[serde(default)]
    pub(super) min_approvals: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
}

/// `mask:`: a masking spec, or `false` to drop the one inherited from
/// `defaults`.
#[derive(Debug)]
pub(super) enum MaskSetting {
    Off,
    On(MaskSpec),
}

/// `mask:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MaskSpec {
    #[serde(default)]
    pub(super) rules: Option<MaskRulesSpec>,
    #[serde(default)]
    pub(super) patterns: Vec<PatternSpec>,
    #[serde(default)]
    pub(super) json_fields: Vec<String>,
    #[serde(default)]
    pub(super) columns: Vec<String>,
}

/// `mask.rules`: `all` or a list of detector rule ids.
#[derive(Debug)]
pub(super) enum MaskRulesSpec {
    All,
    Only(Vec<String>),
}

/// One `mask.patterns` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PatternSpec {
    pub(super) name: String,
    pub(super) regex: String,
}

/// A scalar or a list of scalars; a list matches when any element does.
#[derive(Debug, Clone)]
pub(super) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The values, with whether they were written as a list (for locating
    /// errors on one element).
    pub(super) fn into_parts(self) -> (Vec<T>, bool) {
        match self {
            OneOrMany::One(t) => (vec![t], false),
            OneOrMany::Many(v) => (v, true),
        }
    }
}

// Hand-written instead of `#[serde(untagged)]`: untagged enums replace the
// element's own error ("invalid type: string, expected i64") by "did not
// match any variant", and lose the failing list index.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(OneOrMany::Many(out))
            }
        }

        deserializer.deserialize_any(V(PhantomData))
    }
}

impl<'de> Deserialize<'de> for MaskSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;

        impl<'de> Visitor<'de> for V {
            type Value = MaskSetting;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mask mapping, or `false`")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                if v {
                    Err(E::custom("`mask: true` is not meaningful: give a mapping (rules, patterns, json_fields)"))
                } else {
                    Ok(MaskSetting::Off)
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                MaskSpec::deserialize(de::value::MapAccessDeserializer::new(map)).map(MaskSetting::On)
            }
        }

        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for MaskRulesSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;

        impl<'de> Visitor<'de> for V {
            type Value = MaskRulesSpec;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all` or a list of detector rule ids")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "all" {
                    Ok(MaskRulesSpec::All)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(MaskRulesSpec::Only(out))
            }
        }

        deserializer.deserialize_any(V)
    }
}
