// The review console's only script (embedded in the gateway binary; the
// CSP allows no other). It keeps the approvals queue current: every two
// seconds it reads /approvals.json and rebuilds the pending rows with DOM
// calls (textContent only, never HTML strings), so nothing a request
// carries can run as script.
"use strict";

(function () {
  const table = document.getElementById("pending");
  if (!table) {
    return;
  }
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const body = table.querySelector("tbody");
  const empty = document.getElementById("pending-empty");
  let shown = Array.from(body.querySelectorAll("tr")).map((tr) => tr.dataset.id + "|" + tr.children[5].textContent).join(",");

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function decideForm(id) {
    const form = document.createElement("form");
    form.className = "decide";
    form.method = "post";
    form.action = "/approvals/" + encodeURIComponent(id) + "/decide";
    const token = document.createElement("input");
    token.type = "hidden";
    token.name = "csrf";
    token.value = csrf;
    const comment = document.createElement("input");
    comment.type = "text";
    comment.name = "comment";
    comment.placeholder = "comment";
    form.append(token, comment);
    for (const verdict of ["approve", "deny"]) {
      const button = document.createElement("button");
      button.type = "submit";
      button.name = "verdict";
      button.value = verdict;
      button.textContent = verdict === "approve" ? "Approve" : "Deny";
      form.appendChild(button);
    }
    return form;
  }

  function render(data) {
    const key = data.pending.map((a) => a.id + "|" + a.approvals).join(",");
    // Rebuilding would wipe a comment being typed: only on a change.
    if (key === shown) {
      return;
    }
    shown = key;
    body.replaceChildren();
    for (const a of data.pending) {
      const row = document.createElement("tr");
      row.dataset.id = a.id;
      cell(row, a.id);
      cell(row, a.rule + " (" + a.group + ")");
      cell(row, a.identity);
      const request = cell(row, "");
      const code = document.createElement("code");
      code.textContent = a.request;
      request.appendChild(code);
      cell(row, a.job);
      cell(row, a.approvals);
      cell(row, a.expires_at);
      const actions = cell(row, "");
      if (data.can_decide) {
        actions.appendChild(decideForm(a.id));
      }
      body.appendChild(row);
    }
    if (empty) {
      empty.hidden = data.pending.length > 0;
    }
  }

  async function poll() {
    try {
      const response = await fetch("/approvals.json", { credentials: "same-origin", cache: "no-store" });
      if (response.ok) {
        render(await response.json());
      }
    } catch (e) {
      // The next poll retries.
    }
  }

  setInterval(poll, 2000);
})();
