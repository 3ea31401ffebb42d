//! Who may decide an approval request, and what the decisions add up to.
//! Pure functions over the stored request: the store calls them inside the
//! transaction that records the decision.

use std::collections::BTreeMap;

use super::{ApprovalError, ApprovalView, Approver, NewApproval, State, Verdict, Vouched};

/// CI variables naming the person who triggered a job: that person may not
/// approve the job's requests.
pub(crate) const ACTOR_VARIABLES: &[&str] = &[
    "GITHUB_ACTOR",
    "GITHUB_TRIGGERING_ACTOR",
    "GITLAB_USER_LOGIN",
    "CI_COMMIT_AUTHOR",
    "BUILDKITE_BUILD_CREATOR",
    "BUILDKITE_BUILD_CREATOR_EMAIL",
    "CIRCLE_USERNAME",
    "BUILD_USER_ID",
];

/// Longest approver or group name.
const MAX_NAME: usize = 64;

/// Approver and group names: user-name characters, plus `@` for e-mail
/// style names.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// An approver the rules let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authorized {
    /// The named approver (counted for distinct approvals).
    pub name: String,
    /// How the decision is shown: `alice`, or `alice (via uid 0)`.
    pub recorded_as: String,
}

/// Checks that `approver` may take `verdict` on `approval`.
///
/// `caller_user` is the user name of `approver.uid` (looked up by the
/// caller, so tests need not depend on the host's passwd file).
pub(crate) fn authorize(
    approval: &ApprovalView,
    approver: &Approver,
    verdict: Verdict,
    caller_user: Option<&str>,
    groups: &BTreeMap<String, Vec<String>>,
) -> Result<Authorized, ApprovalError> {
    let name = approver.name.as_str();
    if !valid_name(name) {
        return Err(ApprovalError::Invalid(format!(
            "`{name}` is not an approver name (letters, digits, `.`, `_`, `-`, `@`; at most {MAX_NAME})"
        )));
    }
    // The kernel vouches for the uid; the name typed after --by only counts
    // when it is that uid's own name. Root is trusted to act for others, and
    // the record says so.
    let recorded_as = if let Vouched::Oidc { .. } = approver.vouched {
        // The identity provider vouches for the name (a verified ID token);
        // the record says so.
        format!("oidc:{name}")
    } else if let Vouched::Central { host } = &approver.vouched {
        // Only the store vouches: the record says where it came from.
        if host.is_empty() || host.len() > 255 || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ApprovalError::Invalid(
                "a central decision must name the host it was taken on (1 to 255 characters without spaces)".into(),
            ));
        }
        format!("{name} (central, on {host})")
    } else if approver.uid == 0 {
        if name == "root" {
            name.to_owned()
        } else {
            format!("{name} (via uid 0)")
        }
    } else {
        match caller_user {
            Some(user) if user == name => name.to_owned(),
            Some(user) => {
                return Err(ApprovalError::NotAllowed(format!(
                    "you are {user} (uid {}) and cannot decide as {name}: approvers decide under their own user name (only root may act for another approver)",
                    approver.uid
                )))
            }
            None => {
                return Err(ApprovalError::NotAllowed(format!(
                    "uid {} has no user name, so it cannot be matched to an approver",
                    approver.uid
                )))
            }
        }
    };
    let members = groups.get(&approval.group).map(Vec::as_slice).unwrap_or_default();
    if !members.iter().any(|m| m == name) {
        return Err(ApprovalError::NotAllowed(format!(
            "{name} is not a member of approver group `{}`, which decides {}",
            approval.group, approval.id
        )));
    }
    if approval.state.is_finished() {
        return Err(ApprovalError::AlreadyFinished { id: approval.id, state: approval.state });
    }
    // Denying one's own request only withdraws it, so only approval is
    // guarded against the requester.
    if verdict == Verdict::Approve {
        if approver.identity.as_deref() == Some(approval.identity.as_str()) {
            return Err(ApprovalError::NotAllowed(format!(
                "the approving process has the requesting identity {}; an identity cannot approve its own request",
                approval.identity
            )));
        }
        let aliases = match &approver.vouched {
            Vouched::Kernel | Vouched::Central { .. } => &[][..],
            Vouched::Oidc { aliases } => aliases.as_slice(),
        };
        if let Some(who) = std::iter::once(name)
            .chain(aliases.iter().map(String::as_str))
            .find(|n| approval.requesters.iter().any(|r| r.eq_ignore_ascii_case(n)))
        {
            return Err(ApprovalError::NotAllowed(format!(
                "{who} is behind {} (as requester) and cannot approve it",
                approval.id
            )));
        }
        if approval.decisions.iter().any(|d| d.verdict == Verdict::Approve && d.approver == name) {
            return Err(ApprovalError::AlreadyDecided { id: approval.id, approver: name.to_owned() });
        }
    }
    Ok(Authorized { name: name.to_owned(), recorded_as })
}

/// The state after the decisions recorded on `approval` (including the new
/// one): one deny denies, `min_approvals` distinct approvers approve.
pub(crate) fn tally(approval: &ApprovalView) -> State {
    if approval.decisions.iter().any(|d| d.verdict == Verdict::Deny) {
        State::Denied
    } else if approval.approved_by().len() >= approval.min_approvals as usize {
        State::Approved
    } else {
        State::Pending
    }
}

/// Everyone who may not approve `new`: the explicit requesters, the
/// identity URI, the CI actor variables and the process's unix user.
pub(crate) fn requester_names(new: &NewApproval, user_of_uid: &dyn Fn(u32) -> Option<String>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        let name = name.trim();
        if !name.is_empty() && !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.to_owned());
        }
    };
    add(&new.identity);
    for name in &new.requesters {
        add(name);
    }
    for var in ACTOR_VARIABLES {
        if let Some(value) = new.job.get(*var) {
            add(value);
        }
    }
    if let Some(user) = user_of_uid(new.process.uid) {
        add(&user);
    }
    names
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::approval::{ApprovalId, DecisionView};

    fn approval(group: &str, min: u32) -> ApprovalView {
        ApprovalView {
            id: ApprovalId(7),
            state: State::Pending,
            rule: "deploy".into(),
            group: group.into(),
            min_approvals: min,
            identity: "spiffe://ci/deployer".into(),
            identity_labels: BTreeMap::new(),
            process: Default::default(),
            job: BTreeMap::new(),
            session_id: None,
            method: "POST".into(),
            url: "https://x/deploy".into(),
            destination: "x:443".into(),
            body_preview: String::new(),
            requesters: vec!["spiffe://ci/deployer".into(), "mallory".into()],
            created_at: OffsetDateTime::UNIX_EPOCH,
            expires_at: OffsetDateTime::UNIX_EPOCH,
            finished_at: None,
            decisions: Vec::new(),
        }
    }

    fn groups() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([("release".to_owned(), vec!["alice".to_owned(), "bob".to_owned(), "mallory".to_owned()])])
    }

    fn who(name: &str, uid: u32, identity: Option<&str>) -> Approver {
        Approver { name: name.into(), uid, pid: 42, identity: identity.map(Into::into), vouched: Vouched::Kernel }
    }

    #[test]
    fn a_console_approver_is_recorded_as_oidc_and_never_approves_under_any_of_their_names() {
        let mut a = approval("release", 1);
        a.requesters.push("alice-gh".into());
        let console = |aliases: &[&str]| Approver {
            name: "alice@example.com".into(),
            uid: 0,
            pid: 42,
            identity: None,
            vouched: Vouched::Oidc { aliases: aliases.iter().map(|s| (*s).to_owned()).collect() },
        };
        let mut groups = groups();
        groups.get_mut("release").unwrap().push("alice@example.com".into());
        let ok = authorize(&a, &console(&["alice"]), Verdict::Approve, None, &groups).unwrap();
        assert_eq!(ok.recorded_as, "oidc:alice@example.com");
        let refused = authorize(&a, &console(&["ALICE-GH"]), Verdict::Approve, None, &groups).unwrap_err();
        assert!(refused.to_string().contains("ALICE-GH is behind"), "{refused}");
        // Denying is withdrawing: allowed.
        authorize(&a, &console(&["alice-gh"]), Verdict::Deny, None, &groups).unwrap();
        // Group membership still applies to console approvers.
        let mut outsider = console(&[]);
        outsider.name = "eve@example.com".into();
        assert!(authorize(&a, &outsider, Verdict::Approve, None, &groups).is_err());
    }

    #[test]
    fn a_central_decision_is_checked_like_any_other_and_names_its_host() {
        let central = |name: &str, host: &str| Approver {
            name: name.into(),
            uid: 4242,
            pid: 0,
            identity: None,
            vouched: Vouched::Central { host: host.into() },
        };
        let a = approval("release", 1);
        // The uid is the deciding host's: never looked up here.
        let ok = authorize(&a, &central("alice", "runner-b"), Verdict::Approve, Some("eve"), &groups()).unwrap();
        assert_eq!(ok.recorded_as, "alice (central, on runner-b)");
        let err = authorize(&a, &central("mallory", "runner-b"), Verdict::Approve, None, &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("as requester")), "{err}");
        let err = authorize(&a, &central("carol", "runner-b"), Verdict::Approve, None, &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("not a member")), "{err}");
        let err = authorize(&a, &central("alice", "two words"), Verdict::Approve, None, &groups()).unwrap_err();
        assert_eq!(err.http_status(), http::StatusCode::BAD_REQUEST);
        let mut decided = approval("release", 2);
        decided.decisions.push(decision("alice", Verdict::Approve));
        let err = authorize(&decided, &central("alice", "runner-c"), Verdict::Approve, None, &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::AlreadyDecided { .. }), "{err}");
    }

    fn decision(name: &str, verdict: Verdict) -> DecisionView {
        DecisionView {
            verdict,
            approver: name.into(),
            recorded_as: name.into(),
            uid: 1000,
            pid: 1,
            identity: None,
            comment: None,
            at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn own_user_name_is_accepted() {
        let a = approval("release", 1);
        let ok = authorize(&a, &who("alice", 1000, None), Verdict::Approve, Some("alice"), &groups()).unwrap();
        assert_eq!(ok, Authorized { name: "alice".into(), recorded_as: "alice".into() });
    }

    #[test]
    fn by_must_match_the_callers_user() {
        let a = approval("release", 1);
        let err = authorize(&a, &who("alice", 1001, None), Verdict::Approve, Some("eve"), &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("you are eve")), "{err}");
        let err = authorize(&a, &who("alice", 1001, None), Verdict::Deny, None, &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("no user name")), "{err}");
    }

    #[test]
    fn root_acts_for_a_named_approver_and_is_recorded_so() {
        let a = approval("release", 1);
        let ok = authorize(&a, &who("bob", 0, None), Verdict::Approve, Some("root"), &groups()).unwrap();
        assert_eq!(ok, Authorized { name: "bob".into(), recorded_as: "bob (via uid 0)".into() });
        // Acting for someone outside the group is still refused.
        let err = authorize(&a, &who("carol", 0, None), Verdict::Approve, Some("root"), &groups()).unwrap_err();
        assert_eq!(err.http_status(), http::StatusCode::FORBIDDEN);
    }

    #[test]
    fn approver_must_be_in_the_rules_group() {
        let a = approval("release", 1);
        let err = authorize(&a, &who("carol", 1002, None), Verdict::Approve, Some("carol"), &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("not a member")), "{err}");
        let unknown_group = approval("nobody", 1);
        assert!(authorize(&unknown_group, &who("alice", 0, None), Verdict::Deny, None, &groups()).is_err());
    }

    #[test]
    fn the_requesting_identity_cannot_approve() {
        let a = approval("release", 1);
        let approver = who("alice", 1000, Some("spiffe://ci/deployer"));
        let err = authorize(&a, &approver, Verdict::Approve, Some("alice"), &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("own request")), "{err}");
        // A different identity is fine.
        let approver = who("alice", 1000, Some("spiffe://ci/other"));
        assert!(authorize(&a, &approver, Verdict::Approve, Some("alice"), &groups()).is_ok());
    }

    #[test]
    fn a_requester_cannot_approve_but_may_withdraw() {
        let a = approval("release", 1);
        let err = authorize(&a, &who("MALLORY", 0, None), Verdict::Approve, None, &groups()).unwrap_err();
        // Group membership is checked on the exact name first.
        assert_eq!(err.http_status(), http::StatusCode::FORBIDDEN);
        let err = authorize(&a, &who("mallory", 1003, None), Verdict::Approve, Some("mallory"), &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::NotAllowed(ref m) if m.contains("as requester")), "{err}");
        assert!(authorize(&a, &who("mallory", 1003, None), Verdict::Deny, Some("mallory"), &groups()).is_ok());
        // --by naming the requesting identity itself is refused too (not a
        // valid user name, so it never reaches the group check).
        let err = authorize(&a, &who("spiffe://ci/deployer", 0, None), Verdict::Approve, None, &groups()).unwrap_err();
        assert_eq!(err.http_status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn finished_requests_refuse_decisions() {
        for state in [State::Approved, State::Denied, State::TimedOut, State::Abandoned] {
            let mut a = approval("release", 1);
            a.state = state;
            let err = authorize(&a, &who("alice", 0, None), Verdict::Deny, None, &groups()).unwrap_err();
            assert!(matches!(err, ApprovalError::AlreadyFinished { state: s, .. } if s == state), "{err}");
            assert_eq!(err.http_status(), http::StatusCode::CONFLICT);
        }
    }

    #[test]
    fn one_approver_counts_once() {
        let mut a = approval("release", 2);
        a.decisions.push(decision("alice", Verdict::Approve));
        let err = authorize(&a, &who("alice", 0, None), Verdict::Approve, None, &groups()).unwrap_err();
        assert!(matches!(err, ApprovalError::AlreadyDecided { .. }), "{err}");
        // Changing one's mind towards refusal is allowed.
        assert!(authorize(&a, &who("alice", 0, None), Verdict::Deny, None, &groups()).is_ok());
    }

    #[test]
    fn tally_needs_distinct_approvers_and_one_deny_denies() {
        let mut a = approval("release", 2);
        assert_eq!(tally(&a), State::Pending);
        a.decisions.push(decision("alice", Verdict::Approve));
        a.decisions.push(decision("alice", Verdict::Approve));
        assert_eq!(tally(&a), State::Pending);
        a.decisions.push(decision("bob", Verdict::Approve));
        assert_eq!(tally(&a), State::Approved);
        a.decisions.push(decision("carol", Verdict::Deny));
        assert_eq!(tally(&a), State::Denied);
    }

    #[test]
    fn requesters_come_from_identity_job_and_process() {
        let new = NewApproval {
            identity: "spiffe://ci/job".into(),
            requesters: vec!["Dave".into(), "dave".into(), " ".into()],
            cgroup_id: 1,
            job: BTreeMap::from([
                ("GITHUB_ACTOR".to_owned(), "octocat".to_owned()),
                ("CI_JOB_ID".to_owned(), "12".to_owned()),
            ]),
            process: crate::process::ProcessSnapshot { pid: 5, uid: 1500, ..Default::default() },
            ..Default::default()
        };
        let names = requester_names(&new, &|uid| (uid == 1500).then(|| "runner".to_owned()));
        assert_eq!(names, ["spiffe://ci/job", "Dave", "octocat", "runner"]);
    }

    #[test]
    fn names() {
        assert!(valid_name("alice"));
        assert!(valid_name("a.b-c_d@example.com"));
        assert!(!valid_name(""));
        assert!(!valid_name("alice smith"));
        assert!(!valid_name("spiffe://x"));
        assert!(!valid_name(&"a".repeat(65)));
    }
}
