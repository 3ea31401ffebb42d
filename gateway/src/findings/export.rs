//! Export formats: JSON, SARIF 2.1.0 and CSV.

use std::{collections::BTreeMap, io::Write};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;

use super::model::{ExportFormat, Finding, Status};

/// Writes `findings` to `out` in `format`.
pub(super) fn write(format: ExportFormat, findings: &[Finding], out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        ExportFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, findings)?;
            out.write_all(b"\n")?;
        }
        ExportFormat::Sarif => {
            serde_json::to_writer_pretty(&mut *out, &sarif(findings))?;
            out.write_all(b"\n")?;
        }
        ExportFormat::Csv => csv(findings, out)?,
    }
    out.flush()
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A SARIF 2.1.0 log with one run. Each finding is a result whose logical
/// location is the destination plus the place in the request, and whose
/// partial fingerprint is the key's HMAC, so dashboards deduplicate the way
/// the gateway does.
pub(super) fn sarif(findings: &[Finding]) -> Value {
    let mut rule_ids: Vec<&str> = findings.iter().map(|f| f.rule_id.as_str()).collect();
    rule_ids.sort_unstable();
    rule_ids.dedup();
    let rule_index: BTreeMap<&str, usize> = rule_ids.iter().enumerate().map(|(i, r)| (*r, i)).collect();
    let rules: Vec<Value> = rule_ids
        .iter()
        .map(|id| {
            json!({
                "id": id,
                "name": id,
                "shortDescription": { "text": format!("Static API key ({id}) sent by a CI job") },
                "fullDescription": {
                    "text": "A hard-coded static API key was sent over the network by a CI job. Rotate the key and replace it with a short-lived credential."
                },
                "defaultConfiguration": { "level": "error" },
            })
        })
        .collect();
    let results: Vec<Value> = findings
        .iter()
        .map(|f| {
            let destination = f.destination();
            let exe = f.process.exe.as_deref().unwrap_or("(exited process)");
            let mut result = json!({
                "ruleId": f.rule_id,
                "ruleIndex": rule_index.get(f.rule_id.as_str()).copied().unwrap_or(0),
                // Closed findings stay in the log for the record but do not
                // alert; open ones do.
                "level": match f.status {
                    Status::Open => "error",
                    Status::Acknowledged => "warning",
                    Status::Resolved | Status::FalsePositive => "note",
                },
                "message": {
                    "text": format!(
                        "Static key {} ({}) sent by {} to {} in {}; seen {} time(s), status {}.",
                        f.preview, f.rule_id, exe, destination, f.location, f.count, f.status
                    )
                },
                "locations": [{
                    "logicalLocations": [{
                        "name": f.location,
                        "fullyQualifiedName": format!("{destination}/{}", f.location),
                        "kind": "resource",
                    }]
                }],
                "partialFingerprints": { "staticKeyHmac/v1": f.fingerprint },
                "properties": {
                    "findingId": f.id.to_string(),
                    "status": f.status,
                    "count": f.count,
                    "confidence": f.confidence,
                    "preview": f.preview,
                    "action": f.action,
                    "destination": destination,
                    "firstSeen": rfc3339(f.first_seen),
                    "lastSeen": rfc3339(f.last_seen),
                    "identity": f.identity,
                    "process": f.process,
                    "history": f.history,
                },
            });
            // The best place known: the script of the latest sighting that
            // ran one (relative to the checkout when the job says where that
            // is), and the project and job, so code scanning can place it.
            if let Some(x) = f.sightings.iter().rev().find(|x| x.script.as_deref().is_some_and(|s| s.starts_with('/')))
            {
                let script = x.script.as_deref().unwrap_or_default();
                let root = ["CI_PROJECT_DIR", "GITHUB_WORKSPACE", "BUILDKITE_BUILD_CHECKOUT_PATH", "WORKSPACE"]
                    .iter()
                    .find_map(|v| x.process.job.get(*v))
                    .and_then(|dir| script.strip_prefix(dir.trim_end_matches('/')))
                    .and_then(|rest| rest.strip_prefix('/'));
                let artifact = match root {
                    Some(relative) => json!({ "uri": relative, "uriBaseId": "SRCROOT" }),
                    None => json!({ "uri": format!("file://{script}") }),
                };
                result["locations"][0]["physicalLocation"] = json!({ "artifactLocation": artifact });
            }
            if let Some(x) = f.sightings.last() {
                result["properties"]["project"] = json!(super::model::project_of(&x.process.job));
                result["properties"]["job"] = json!(x.process.job);
                result["properties"]["script"] = json!(x.script);
                result["properties"]["command"] = json!(x.command);
                result["properties"]["sessionId"] = json!(x.session_id);
                result["properties"]["sightings"] = json!(f.sightings.len());
            }
            if f.status == Status::FalsePositive {
                let justification = f
                    .history
                    .iter()
                    .rev()
                    .find(|h| h.to == Status::FalsePositive)
                    .map(|h| format!("{} ({})", h.comment, h.by))
                    .unwrap_or_default();
                result["suppressions"] =
                    json!([{ "kind": "external", "status": "accepted", "justification": justification }]);
            }
            result
        })
        .collect();
    sarif_log(rules, results)
}

/// A SARIF 2.1.0 log of one run of the gateway's tool with these rules and
/// results (findings exports and `gateway scan --format sarif`).
pub(crate) fn sarif_log(rules: Vec<Value>, results: Vec<Value>) -> Value {
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "ci-gateway",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": rules,
                }
            },
            "results": results,
        }]
    })
}

/// CSV columns, in order.
pub(super) const CSV_HEADER: &[&str] = &[
    "id",
    "status",
    "rule_id",
    "confidence",
    "fingerprint",
    "preview",
    "location",
    "dest_host",
    "dest_port",
    "pid",
    "uid",
    "exe",
    "comm",
    "cgroup",
    "job",
    "identity",
    "first_seen",
    "last_seen",
    "count",
    "action",
    "container_id",
    "container_name",
    "container_image",
];

/// RFC 4180 CSV (CRLF line ends, fields quoted when needed).
fn csv(findings: &[Finding], out: &mut dyn Write) -> std::io::Result<()> {
    let header: Vec<String> = CSV_HEADER.iter().map(|h| (*h).to_owned()).collect();
    csv_row(out, &header)?;
    for f in findings {
        let container = f.process.container.as_ref();
        let row = vec![
            f.id.to_string(),
            f.status.to_string(),
            f.rule_id.clone(),
            f.confidence.clone(),
            f.fingerprint.clone(),
            f.preview.clone(),
            f.location.clone(),
            f.dest_host.clone(),
            f.dest_port.to_string(),
            f.process.pid.to_string(),
            f.process.uid.to_string(),
            f.process.exe.clone().unwrap_or_default(),
            f.process.comm.clone(),
            f.process.cgroup.clone().unwrap_or_default(),
            serde_json::to_string(&f.process.job).unwrap_or_default(),
            f.identity.clone().unwrap_or_default(),
            rfc3339(f.first_seen),
            rfc3339(f.last_seen),
            f.count.to_string(),
            f.action.to_string(),
            container.map(|c| c.id.clone()).unwrap_or_default(),
            container.and_then(|c| c.name.clone()).unwrap_or_default(),
            container.and_then(|c| c.image.clone()).unwrap_or_default(),
        ];
        csv_row(out, &row)?;
    }
    Ok(())
}

fn csv_row(out: &mut dyn Write, fields: &[String]) -> std::io::Result<()> {
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.write_all(line.join(",").as_bytes())?;
    out.write_all(b"\r\n")
}

/// Quotes a field when needed. Values starting with a formula character get
/// a leading `'`: previews, locations and process names come from the CI
/// job, and a spreadsheet must not evaluate `=HYPERLINK(...)` planted there.
fn csv_field(value: &str) -> String {
    let value =
        if value.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{value}") } else { value.to_owned() };
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("-1"), "'-1");
        assert_eq!(csv_field(""), "");
    }
}
