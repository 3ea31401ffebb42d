//! `gateway scan` as a command-line secret scanner, run as a user would:
//! a git repository whose key was committed and deleted later (found at
//! its commit with `--git`), a directory with a `.gitignore`, a HAR file,
//! and a saved HTTP request with a gzip body. Output in text, JSON and
//! SARIF; the key itself never appears in any of it.

use std::{io::Write as _, path::Path, process::Command};

use base64::Engine as _;
use gateway_tests::{gateway_bin, keys};
use serde_json::Value;

/// Runs `gateway scan ARGS` in `dir` with a configuration whose state
/// directory is `dir/state`; returns (exit code, stdout, stderr).
fn scan(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let config = dir.join("gateway.yaml");
    std::fs::write(&config, format!("state_dir: {}\n", state.display())).expect("config");
    let out = Command::new(gateway_bin())
        .arg("--config")
        .arg(&config)
        .arg("scan")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("gateway scan");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn no_key(what: &str, out: &str, key: &str) {
    assert!(!out.contains(key), "{what}: the output holds the key");
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

#[test]
fn git_history_finds_a_key_committed_then_deleted_at_its_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README"), "hello\n").expect("write");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let key = keys::github_token();
    std::fs::write(repo.join("deploy.sh"), format!("#!/bin/sh\n\n# token\nexport GITHUB_TOKEN={key}\n"))
        .expect("write");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "add deploy"]);
    let added = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("deploy.sh"), "#!/bin/sh\n").expect("write");
    git(&repo, &["commit", "-q", "-am", "remove the token"]);

    // The working tree is clean now...
    let (code, out, err) = scan(dir.path(), &["repo"]);
    assert_eq!(code, 0, "the tree holds no key: {out}{err}");
    // ...but history is not.
    let (code, out, err) = scan(dir.path(), &["--git", "--format", "json", "repo"]);
    no_key("git json", &format!("{out}{err}"), &key);
    assert_eq!(code, 1, "{out}{err}");
    let found = json_lines(&out);
    let f = found.iter().find(|f| f["rule_id"] == "github-pat").unwrap_or_else(|| panic!("no github-pat: {out}"));
    assert_eq!(f["commit"], added.as_str(), "{f}");
    assert_eq!(f["path"], "deploy.sh");
    assert_eq!(f["line"], 4, "the line in that commit's file");
    // Text and SARIF say the same.
    let (_, text, _) = scan(dir.path(), &["--git", "repo"]);
    no_key("git text", &text, &key);
    assert!(text.contains(&format!("{added}:deploy.sh:4:")), "{text}");
    let (_, sarif, _) = scan(dir.path(), &["--git", "--format", "sarif", "repo"]);
    no_key("git sarif", &sarif, &key);
    let log: Value = serde_json::from_str(&sarif).expect("SARIF JSON");
    let result = &log["runs"][0]["results"][0];
    assert_eq!(result["ruleId"], "github-pat");
    assert_eq!(result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"], "deploy.sh");
    assert_eq!(result["locations"][0]["physicalLocation"]["region"]["startLine"], 4);
    assert_eq!(result["properties"]["commit"], added.as_str());
}

#[test]
fn directories_honour_gitignore_and_skip_binary_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("build")).expect("mkdir");
    let (seen, ignored) = (keys::github_token(), keys::github_token());
    std::fs::write(tree.join(".gitignore"), "build/\n").expect("write");
    std::fs::write(tree.join("config.env"), format!("TOKEN={seen}\n")).expect("write");
    std::fs::write(tree.join("build/out.env"), format!("TOKEN={ignored}\n")).expect("write");
    std::fs::write(tree.join("blob.bin"), format!("\0\0TOKEN={ignored}\n")).expect("write");
    let (code, out, err) = scan(dir.path(), &["--json", "tree"]);
    no_key("dir", &format!("{out}{err}"), &seen);
    no_key("dir", &format!("{out}{err}"), &ignored);
    assert_eq!(code, 1, "{out}{err}");
    let found = json_lines(&out);
    assert_eq!(found.len(), 1, "only the file git would track: {out}");
    assert!(found[0]["path"].as_str().is_some_and(|p| p.ends_with("config.env")), "{out}");
    assert_eq!(found[0]["line"], 1);
    let (_, out, _) = scan(dir.path(), &["--json", "--no-ignore", "tree"]);
    assert_eq!(json_lines(&out).len(), 2, "--no-ignore walks build/ too (binary still skipped): {out}");
}

#[test]
fn a_har_file_and_a_gzip_http_message_are_read_like_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A HAR: a key in a request header, another in a base64 response body.
    let (auth, body_key) = (keys::openai_key(), keys::github_token());
    let content = base64::engine::general_purpose::STANDARD.encode(format!("{{\"token\": \"{body_key}\"}}"));
    let har = serde_json::json!({"log": {"version": "1.2", "entries": [{
        "request": {"method": "POST", "url": "https://api.example.com/v1/x?a=1",
            "headers": [{"name": "Authorization", "value": format!("Bearer {auth}")}],
            "postData": {"mimeType": "application/json", "text": "{\"q\": 1}"}},
        "response": {"status": 200, "headers": [{"name": "Content-Type", "value": "application/json"}],
            "content": {"mimeType": "application/json", "encoding": "base64", "text": content}}
    }]}});
    std::fs::write(dir.path().join("session.har"), serde_json::to_string_pretty(&har).expect("json")).expect("write");
    let (code, out, err) = scan(dir.path(), &["--json", "session.har"]);
    no_key("har", &format!("{out}{err}"), &auth);
    no_key("har", &format!("{out}{err}"), &body_key);
    assert_eq!(code, 1, "{out}{err}");
    let found = json_lines(&out);
    let at = |rule: &str| {
        found.iter().find(|f| f["rule_id"] == rule).unwrap_or_else(|| panic!("no {rule} in {out}")).clone()
    };
    let header = at("openai-project-key");
    assert_eq!(header["location"], "entries[0].request.header:authorization", "{header}");
    assert!(header["line"].as_u64().is_some_and(|l| l > 1), "the header's line: {header}");
    let body = at("github-pat");
    assert!(body["location"].as_str().is_some_and(|l| l.starts_with("entries[0].response.body")), "{body}");

    // A saved request with a gzip JSON body: found only by decoding it.
    let key = keys::github_token();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("{{\"messages\": [\"use {key}\"]}}").as_bytes()).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let mut msg = format!(
        "POST /v1/chat HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        gz.len()
    )
    .into_bytes();
    msg.extend_from_slice(&gz);
    std::fs::write(dir.path().join("request.http"), &msg).expect("write");
    let (code, out, err) = scan(dir.path(), &["--format", "json", "request.http"]);
    no_key("http", &format!("{out}{err}"), &key);
    assert_eq!(code, 1, "the gzip body is decoded: {out}{err}");
    let found = json_lines(&out);
    assert_eq!(found[0]["rule_id"], "github-pat", "{out}");
    assert!(found[0]["location"].as_str().is_some_and(|l| l.starts_with("body")), "{out}");
    assert_eq!(found[0]["line"], 7, "in the body, which starts on line 7: {out}");
}
