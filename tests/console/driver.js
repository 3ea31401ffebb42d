// Drives Debian's Chromium (headless) through playwright-core for
// tests/console.rs, as a person would use the console: one JSON command per
// stdin line, one JSON answer per stdout line ({ok: true, ...} or
// {ok: false, error}). Each named browser context is a separate person
// (its own cookies).
//
// Environment: CONSOLE_URL (the console's origin), CHROMIUM (executable),
// SCREENSHOTS (directory).
"use strict";

const readline = require("node:readline");
const path = require("node:path");
const { chromium } = require("playwright-core");

const consoleUrl = process.env.CONSOLE_URL;
const shots = process.env.SCREENSHOTS;
let browser;
const contexts = {};

async function pageOf(name) {
  if (!contexts[name]) {
    // The console's certificate is the test's own, not in Chromium's store.
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });
    const page = await context.newPage();
    const errors = [];
    // CSP violations and script errors show up in the console: collect them.
    // Noted with the page they happened on (the provider's pages have
    // their own).
    page.on("console", (m) => {
      if (m.type() === "error") errors.push(page.url() + " " + m.text());
    });
    page.on("pageerror", (e) => errors.push(page.url() + " script error: " + String(e)));
    contexts[name] = { context, page, errors };
  }
  return contexts[name];
}

async function state(page, response) {
  return {
    url: page.url(),
    status: response ? response.status() : null,
    content: await page.content(),
  };
}

const commands = {
  // Sign in through the identity provider's login form and consent page.
  async signIn({ who, user }) {
    const { page } = await pageOf(who);
    await page.goto(consoleUrl + "/auth/login");
    await page.fill('input[name="login"]', user);
    await page.fill('input[name="password"]', "any password");
    await page.click('button[type="submit"]');
    const atConsole = (u) => u.toString().startsWith(consoleUrl);
    // Either straight back to the console, or the provider's consent
    // prompt first (the first sign-in).
    const consent = page.locator('button:has-text("Continue")');
    await Promise.race([page.waitForURL(atConsole, { timeout: 15000 }), consent.waitFor({ timeout: 15000 })]);
    if (!atConsole(page.url())) {
      await consent.click();
      await page.waitForURL(atConsole, { timeout: 15000 });
    }
    await page.waitForLoadState();
    return state(page, null);
  },
  async goto({ who, path: p }) {
    const { page } = await pageOf(who);
    const response = await page.goto(consoleUrl + p);
    return state(page, response);
  },
  async click({ who, selector }) {
    const { page } = await pageOf(who);
    const [response] = await Promise.all([page.waitForNavigation(), page.click(selector)]);
    return state(page, response);
  },
  async fill({ who, selector, value }) {
    const { page } = await pageOf(who);
    await page.fill(selector, value);
    return {};
  },
  async select({ who, selector, value }) {
    const { page } = await pageOf(who);
    await page.selectOption(selector, value);
    return {};
  },
  async waitFor({ who, selector, timeout }) {
    const { page } = await pageOf(who);
    await page.waitForSelector(selector, { timeout: timeout || 15000 });
    return state(page, null);
  },
  async content({ who }) {
    const { page } = await pageOf(who);
    return state(page, null);
  },
  async csrf({ who }) {
    const { page } = await pageOf(who);
    return { csrf: await page.getAttribute('meta[name="csrf-token"]', "content") };
  },
  // A form POST with this person's cookies, as a forged or hand-made
  // request would be sent (the page's own forms are used through click).
  async post({ who, path: p, form }) {
    const { context } = await pageOf(who);
    const response = await context.request.post(consoleUrl + p, { form, maxRedirects: 0 });
    return { status: response.status(), body: await response.text(), headers: response.headers() };
  },
  async get({ who, path: p }) {
    const { context } = await pageOf(who);
    const response = await context.request.get(consoleUrl + p, { maxRedirects: 0 });
    return { status: response.status(), body: await response.text(), headers: response.headers() };
  },
  async cookies({ who }) {
    const { context } = await pageOf(who);
    return { cookies: await context.cookies() };
  },
  async screenshot({ who, name }) {
    const { page } = await pageOf(who);
    const file = path.join(shots, name + ".png");
    await page.screenshot({ path: file, fullPage: true });
    return { file };
  },
  async errors({ who }) {
    const { errors } = await pageOf(who);
    return { errors };
  },
};

async function main() {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    headless: true,
    // Root in the test: Chromium's sandbox refuses to run as root.
    args: ["--no-sandbox"],
  });
  const rl = readline.createInterface({ input: process.stdin });
  console.log(JSON.stringify({ ok: true, ready: true }));
  for await (const line of rl) {
    let answer;
    try {
      const cmd = JSON.parse(line);
      const run = commands[cmd.cmd];
      if (!run) throw new Error("unknown command " + cmd.cmd);
      answer = { ok: true, ...(await run(cmd)) };
    } catch (e) {
      answer = { ok: false, error: String(e && e.stack ? e.stack : e) };
    }
    console.log(JSON.stringify(answer));
  }
  await browser.close();
}

main().catch((e) => {
  console.log(JSON.stringify({ ok: false, error: String(e) }));
  process.exit(1);
});
