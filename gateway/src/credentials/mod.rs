//! Credential swapping and workload identity tokens.
//!
//! A CI job that hard-codes a static API key gets that key *replaced* on the
//! wire by a credential the gateway holds for the job's machine identity (an
//! operator-defined SPIFFE-style URI such as `spiffe://ci.example/repo/acme/api`):
//!
//! * [`store`]: upstream credentials per (identity glob, host glob), read from
//!   root-only files, the gateway's environment or a command; reloadable.
//! * [`swap`]: removes the job's key from a request head and injects the
//!   gateway-held credential (`Authorization: Bearer …`, Basic, a custom header
//!   or a query parameter), or a freshly minted JWT.
//! * [`lease`]: per-session credentials (entries with `revoke`), issued
//!   when a session first needs one and revoked when it ends.
//! * [`jwt`]: short-lived JWTs (ES256 or EdDSA) signed by rotating keys kept
//!   in `state_dir/jwt/`, with a JWKS document so backends can verify callers.
//! * [`oidc`]: validation of OIDC ID tokens a job presents (e.g. the CI
//!   system's job token) against the issuer's JWKS.
//!
//! Configuration lives in [`config`] and is documented in `docs/credentials.md`.
//! Nothing here ever logs a credential or token: only key ids, token ids and
//! subjects.

pub mod clock;
pub mod config;
mod glob;
pub(crate) mod http_fetch;
pub mod jwt;
pub mod lease;
pub mod oidc;
pub mod secret;
pub mod store;
pub mod swap;

#[cfg(test)]
mod test_support;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    CommandSource, CredentialEntry, CredentialsConfig, Injection, JwtAlgorithm, JwtConfig, OidcProvider, RevokeCommand,
    Source,
};
pub use jwt::{GatewayClaims, JwtError, MintRequest, MintedToken, Minter};
pub use lease::{LeaseHolder, SessionLeases};
pub use oidc::{OidcError, OidcValidator, VerifiedClaims};
pub use secret::SecretString;
pub use store::{Credential, CredentialStore, SessionIssue, StoreError};
pub use swap::{apply_swap, prepare, RenderedInjection, SwapError, SwapOutcome, SwapTarget};
