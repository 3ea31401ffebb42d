// A local OpenID Connect provider for the console test: node-oidc-provider
// (npm `oidc-provider`, the certified implementation) on loopback with one
// confidential client that must use PKCE, and two test users whose groups
// map to console roles. Its development login form accepts any password;
// the account id is the login name.
//
// Environment: IDP_PORT, CLIENT_ID, CLIENT_SECRET_FILE, REDIRECT_URI.
// Prints "ready <issuer>" once it listens.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

// ESM resolution ignores NODE_PATH (where the test's npm packages are);
// CommonJS resolution honours it and loads the ESM package (node >= 20.19).
const require = createRequire(import.meta.url);
const oidc = require("oidc-provider");
const Provider = oidc.default || oidc;

const port = Number(process.env.IDP_PORT);
const issuer = `http://127.0.0.1:${port}`;
const secret = readFileSync(process.env.CLIENT_SECRET_FILE, "utf8").trim();

// Login name -> groups. alice reviews and approves; victor only views;
// "deployer" is the CI user behind held requests (GITHUB_ACTOR).
const users = {
  alice: ["security-team", "release-approvers"],
  victor: ["everyone"],
  deployer: ["security-team", "release-approvers"],
};

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: process.env.CLIENT_ID,
      client_secret: secret,
      redirect_uris: [process.env.REDIRECT_URI],
      response_types: ["code"],
      grant_types: ["authorization_code"],
      token_endpoint_auth_method: "client_secret_basic",
    },
  ],
  pkce: { required: () => true },
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified"],
    profile: ["preferred_username", "name", "groups"],
  },
  // Scope-requested claims go into the ID token (as most enterprise
  // providers are configured to do for groups).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ["console-test-only-cookie-key"] },
  async findAccount(ctx, id) {
    if (!(id in users)) {
      return undefined;
    }
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: `${id}@example.test`,
          email_verified: true,
          preferred_username: id,
          name: id,
          groups: users[id],
        };
      },
    };
  },
});

provider.listen(port, "127.0.0.1", () => {
  console.log(`ready ${issuer}`);
});
