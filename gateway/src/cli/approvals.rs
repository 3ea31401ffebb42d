//! `gateway approvals ...`: list, inspect, approve and deny held requests.
//! A client of the admin API on its unix socket, so the gateway (not this
//! process) checks who is deciding.
//!
//! With `--store`, `approve` and `deny` decide a request held on any host of
//! the fleet through the central store instead (see `fleet::approvals`):
//! the rules are checked here against the store's copy of the request, and
//! again by the holding host before it releases anything.
//!
//! Exit status: 0 on success, 1 when the gateway refused the request (not an
//! approver, no such request, already decided...), 2 when it could not be
//! asked (not running, no access to the socket...).

use std::{io::Write, path::Path, process::ExitCode};

use anyhow::{bail, Context as _};

use crate::{
    api::AdminClient,
    approval::{ApprovalId, ApprovalView, ListFilter, State, Verdict},
    config::Config,
    term::{safe, when},
};

/// Arguments of `gateway approvals`.
#[derive(Debug, clap::Args)]
pub struct ApprovalsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ApprovalsCommand,
}

/// Sub-commands of `gateway approvals`.
#[derive(Debug, clap::Subcommand)]
pub enum ApprovalsCommand {
    /// List approval requests, newest first (pending ones unless --all or --state).
    List {
        /// Every request, whatever its state.
        #[arg(long, conflicts_with = "state")]
        all: bool,
        /// Only requests in this state (pending, approved, denied, timed_out, abandoned).
        #[arg(long, value_parser = parse_state)]
        state: Option<State>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List the fleet's central store instead (every host's requests):
        /// this connection string or URL, or `fleet.store` when given
        /// without a value.
        #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
        store: Option<String>,
    },
    /// Show one request with its decisions.
    Show {
        /// Request id (A-12 or 12).
        #[arg(value_parser = parse_id)]
        id: ApprovalId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a held request.
    Approve(DecideArgs),
    /// Deny a held request (it is refused at once).
    Deny(DecideArgs),
}

/// Arguments of `approve` and `deny`.
#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    /// Request id (A-12 or 12).
    #[arg(value_parser = parse_id)]
    pub id: ApprovalId,
    /// The approver: your own user name (the default); root may name another approver.
    #[arg(long)]
    pub by: Option<String>,
    /// Why (recorded, sent to the webhook).
    #[arg(long)]
    pub comment: Option<String>,
    /// Print the request afterwards as JSON.
    #[arg(long)]
    pub json: bool,
    /// Decide through the fleet's central store (a request held on any
    /// host): this connection string or URL, or `fleet.store` when given
    /// without a value.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub store: Option<String>,
    /// With --store: the host holding the request (needed when its id is
    /// pending on several hosts).
    #[arg(long, requires = "store")]
    pub host_id: Option<String>,
    /// With --store: how long to wait for the holding host to apply the
    /// decision, in seconds.
    #[arg(long, requires = "store", default_value_t = 5)]
    pub wait: u64,
}

fn parse_state(s: &str) -> Result<State, String> {
    s.parse()
}

fn parse_id(s: &str) -> Result<ApprovalId, String> {
    s.parse()
}

/// Runs `gateway approvals` against the admin socket of `config`
/// (`api.admin_socket`).
pub fn run(config: &Config, args: &ApprovalsArgs) -> anyhow::Result<ExitCode> {
    if let ApprovalsCommand::Approve(d @ DecideArgs { store: Some(_), .. })
    | ApprovalsCommand::Deny(d @ DecideArgs { store: Some(_), .. }) = &args.command
    {
        let verdict =
            if matches!(args.command, ApprovalsCommand::Approve(_)) { Verdict::Approve } else { Verdict::Deny };
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
        return runtime.block_on(decide_central(config, d, verdict, &mut std::io::stdout().lock()));
    }
    if let ApprovalsCommand::List { all, state, limit, json, store: Some(url) } = &args.command {
        let state = if *all { None } else { Some(state.unwrap_or(State::Pending)) };
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
        let listed = runtime.block_on(async {
            let client = crate::fleet::connect(&config.fleet, Some(url.as_str()).filter(|u| !u.is_empty())).await?;
            crate::fleet::approvals::list(&client, state, *limit).await
        })?;
        let text = if *json { render_json(&listed) } else { render_central_list(&listed) };
        let mut out = std::io::stdout().lock();
        return match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to standard output"),
            _ => Ok(ExitCode::SUCCESS),
        };
    }
    let Some(socket) = config.api.admin_socket.as_deref() else {
        bail!("api.admin_socket is null: the admin API, and with it approvals, is disabled");
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(run_to(args, socket, &mut std::io::stdout().lock()))
}

/// Runs `gateway approvals` against the admin socket at `socket`, printing
/// to `out`. Refusals by the gateway are printed and give exit status 1; an
/// `Err` is for the caller to print (exit status 2).
pub async fn run_to(args: &ApprovalsArgs, socket: &Path, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(socket);
    let result = match &args.command {
        ApprovalsCommand::List { all, state, limit, json, .. } => {
            let state = if *all { None } else { Some(state.unwrap_or(State::Pending)) };
            let filter = ListFilter { state, limit: *limit };
            client.approvals(&filter).await.map(|views| render_list(&views, *json))
        }
        ApprovalsCommand::Show { id, json } => client.approval(*id).await.map(|view| render_one(&view, *json)),
        ApprovalsCommand::Approve(d) | ApprovalsCommand::Deny(d) => {
            let verdict =
                if matches!(args.command, ApprovalsCommand::Approve(_)) { Verdict::Approve } else { Verdict::Deny };
            let by = match &d.by {
                Some(by) => by.clone(),
                None => own_user_name().with_context(|| {
                    format!("uid {} has no user name; name the approver with --by", nix::unistd::getuid())
                })?,
            };
            client.decide(d.id, verdict, &by, d.comment.as_deref()).await.map(|view| {
                if d.json {
                    render_json(&view)
                } else {
                    render_decision(&view, verdict, &by)
                }
            })
        }
    };
    match result {
        Ok(text) => match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            // `gateway approvals list | head`: the reader has what it wanted.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to standard output"),
            _ => Ok(ExitCode::SUCCESS),
        },
        Err(e) if e.is_refusal() => {
            eprintln!("gateway: {e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

/// `gateway approvals approve|deny ID --store [URL]`: records the decision
/// in the central store after checking it there, then waits (`--wait`) for
/// the holding host to apply it and says what it did.
async fn decide_central(
    config: &Config,
    d: &DecideArgs,
    verdict: Verdict,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    use crate::fleet::approvals::{self as central, Applied, CentralDecision, DecideError};
    let url = d.store.as_deref().filter(|s| !s.is_empty());
    let uid = nix::unistd::getuid().as_raw();
    let caller_user = own_user_name();
    let by = match &d.by {
        Some(by) => by.clone(),
        None => {
            caller_user.clone().with_context(|| format!("uid {uid} has no user name; name the approver with --by"))?
        }
    };
    let decided_on = config.fleet.host_id()?;
    let mut client = crate::fleet::connect(&config.fleet, url).await?;
    let decision = CentralDecision {
        host_id: d.host_id.as_deref(),
        id: d.id,
        verdict,
        by: &by,
        vouched: &crate::approval::Vouched::Kernel,
        uid,
        caller_user: caller_user.as_deref(),
        comment: d.comment.as_deref(),
        decided_on: &decided_on,
    };
    let decided = match central::decide(&mut client, &config.approvals.groups, &decision).await {
        Ok(decided) => decided,
        Err(DecideError::Refused(e)) => {
            eprintln!("gateway: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(DecideError::Store(e)) => return Err(e.into()),
    };
    let applied = central::wait_applied(&client, decided.decision_id, std::time::Duration::from_secs(d.wait)).await?;
    let host = &decided.host_id;
    let what = match verdict {
        Verdict::Approve => "approved",
        Verdict::Deny => "denied",
    };
    let text = if d.json {
        render_json(&serde_json::json!({
            "decision_id": decided.decision_id,
            "host_id": host,
            "id": d.id,
            "verdict": verdict,
            "by": by,
            "outcome": applied.as_ref().map(|(a, _)| *a),
            "reason": applied.as_ref().and_then(|(_, r)| r.clone()),
        }))
    } else {
        let then = match &applied {
            Some((Applied::Applied, _)) => format!("{} applied it", safe(host)),
            Some((other, reason)) => {
                format!("{} {} it: {}", safe(host), other.as_str(), safe(reason.as_deref().unwrap_or("no reason given")))
            }
            None => format!(
                "{} has not applied it yet (it will when it next reaches the store; the request may time out meanwhile)",
                safe(host)
            ),
        };
        format!(
            "{}/{} {what} by {} in the central store (decision {}); {then}\n",
            safe(host),
            d.id,
            safe(&by),
            decided.decision_id
        )
    };
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("writing to standard output")?;
    Ok(match applied {
        Some((Applied::Rejected | Applied::Stale, _)) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

fn own_user_name() -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name)
}

fn render_decision(view: &ApprovalView, verdict: Verdict, by: &str) -> String {
    let what = match verdict {
        Verdict::Approve => "approved",
        Verdict::Deny => "denied",
    };
    let state = match view.state {
        State::Pending => format!("still pending: {} of {} approvals", view.approved_by().len(), view.min_approvals),
        State::Approved => "approved: the request is released".to_owned(),
        State::Denied => "denied: the request is refused".to_owned(),
        other => other.to_string(),
    };
    format!("{} {what} by {}; {state}\n", view.id, safe(by))
}

fn render_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising these plain data types cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

fn render_list(views: &[ApprovalView], json: bool) -> String {
    if json {
        return render_json(&views);
    }
    if views.is_empty() {
        return "no approval requests\n".to_owned();
    }
    let mut text = format!(
        "{:<8} {:<10} {:<20} {:<7} {:<20} {:<40} {}\n",
        "ID", "STATE", "REQUESTED", "VOTES", "RULE", "REQUEST", "IDENTITY"
    );
    for v in views {
        text.push_str(&format!(
            "{:<8} {:<10} {:<20} {:<7} {:<20} {:<40} {}\n",
            v.id.to_string(),
            v.state.as_str(),
            when(v.created_at),
            format!("{}/{}", v.approved_by().len(), v.min_approvals),
            safe(&v.rule),
            safe(&format!("{} {}", v.method, v.url)),
            safe(&v.identity),
        ));
    }
    text
}

fn render_central_list(list: &[crate::fleet::approvals::CentralApproval]) -> String {
    if list.is_empty() {
        return "no approval requests in the central store\n".to_owned();
    }
    let mut text = format!(
        "{:<16} {:<8} {:<10} {:<20} {:<20} {:<40} {}\n",
        "HOST", "ID", "STATE", "REQUESTED", "RULE", "REQUEST", "IDENTITY"
    );
    for a in list {
        text.push_str(&format!(
            "{:<16} {:<8} {:<10} {:<20} {:<20} {:<40} {}\n",
            safe(&a.host_id),
            a.id.to_string(),
            safe(&a.state),
            when(a.created_at),
            safe(&a.rule),
            safe(&format!("{} {}", a.method, a.url)),
            safe(&a.identity),
        ));
    }
    text
}

fn render_one(v: &ApprovalView, json: bool) -> String {
    if json {
        return render_json(v);
    }
    let mut text = String::new();
    let mut line = |label: &str, value: &str| text.push_str(&format!("{label:<14} {}\n", safe(value)));
    line("id:", &v.id.to_string());
    line("state:", v.state.as_str());
    line("rule:", &v.rule);
    line("approvers:", &format!("group {}, {} of {} approvals", v.group, v.approved_by().len(), v.min_approvals));
    line("request:", &format!("{} {}", v.method, v.url));
    line("destination:", &v.destination);
    line("identity:", &v.identity);
    for (k, val) in &v.identity_labels {
        line("  label:", &format!("{k}={val}"));
    }
    line("process:", &serde_json::to_string(&v.process).unwrap_or_default());
    for (k, val) in &v.job {
        line("  job:", &format!("{k}={val}"));
    }
    if let Some(session) = &v.session_id {
        line("session:", session);
    }
    line("requesters:", &v.requesters.join(", "));
    line("requested:", &when(v.created_at));
    line("expires:", &when(v.expires_at));
    if let Some(t) = v.finished_at {
        line("finished:", &when(t));
    }
    for d in &v.decisions {
        let comment = d.comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default();
        line(
            "decision:",
            &format!("{} {} by {} (uid {}, pid {}){comment}", when(d.at), d.verdict, d.recorded_as, d.uid, d.pid),
        );
    }
    if !v.body_preview.is_empty() {
        text.push_str("body preview (masked):\n");
        for l in v.body_preview.lines() {
            text.push_str(&format!("  {}\n", safe(l)));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_text_cannot_drive_the_terminal() {
        let now = time::OffsetDateTime::now_utc();
        let view = ApprovalView {
            id: ApprovalId(7),
            state: State::Pending,
            rule: "deploy".into(),
            group: "release".into(),
            min_approvals: 1,
            identity: "spiffe://ci/job".into(),
            identity_labels: Default::default(),
            process: crate::process::ProcessSnapshot { comm: "curl\u{202e}".into(), ..Default::default() },
            job: Default::default(),
            session_id: None,
            method: "POST".into(),
            url: "/deploy/\u{202e}dorp\u{1b}[2J\u{061c}\u{2069}".into(),
            destination: "api.internal:443".into(),
            body_preview: "line\u{2066}one\nline two".into(),
            requesters: Vec::new(),
            created_at: now,
            expires_at: now,
            finished_at: None,
            decisions: Vec::new(),
        };
        for text in [render_list(std::slice::from_ref(&view), false), render_one(&view, false)] {
            assert!(text.contains("/deploy/\\u{202e}dorp\\u{1b}[2J\\u{61c}\\u{2069}"), "{text}");
            assert!(!text.contains(['\u{202e}', '\u{1b}', '\u{2066}', '\u{061c}', '\u{2069}']), "{text}");
        }
    }

    #[test]
    fn arguments_parse() {
        use clap::Parser as _;
        #[derive(Debug, clap::Parser)]
        struct Top {
            #[command(subcommand)]
            cmd: ApprovalsCommand,
        }
        let t = Top::try_parse_from(["x", "approve", "A-4", "--by", "alice", "--comment", "ok"]).unwrap();
        assert!(
            matches!(t.cmd, ApprovalsCommand::Approve(DecideArgs { id: ApprovalId(4), ref by, .. }) if by.as_deref() == Some("alice"))
        );
        let t = Top::try_parse_from(["x", "list", "--state", "timed_out"]).unwrap();
        assert!(matches!(t.cmd, ApprovalsCommand::List { state: Some(State::TimedOut), all: false, .. }));
        assert!(Top::try_parse_from(["x", "list", "--all", "--state", "pending"]).is_err());
        assert!(Top::try_parse_from(["x", "show", "F-1"]).is_err());
    }
}
