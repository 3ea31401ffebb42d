//! A transparent interception gateway for shared CI runner hosts.
//!
//! Data flows one way: an intercepted connection ([`intercept`]) is
//! attributed to the process that made it ([`process`]), handed to the proxy
//! ([`proxy`]) which terminates TLS where configured ([`tls`]), speaks HTTP
//! ([`http`]), applies the policy ([`policy`], [`enforce`], [`approval`]),
//! looks for static keys ([`detect`]) and records findings ([`findings`]),
//! masks responses ([`mask`]), records the session ([`record`]), and
//! forwards to the original destination. What the local stores record is
//! shipped to the fleet's central store ([`fleet`]).

pub mod api;
pub mod approval;
pub mod cli;
pub mod config;
pub mod console;
pub mod credentials;
pub mod detect;
pub mod enforce;
pub mod event;
pub mod findings;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod intercept;
pub mod limits;
pub mod logging;
pub mod mask;
pub mod metrics;
pub mod policy;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod record;
pub mod redact;
pub mod relay;
pub mod sqlite;
pub mod term;
pub mod tls;
pub mod watchdog;
