// Mint a user token for the appevents Connect Portal, as a product's backend does.
//
// Usage: node mint.js USER_ID
// Environment: APPEVENTS_USER_TOKEN_KEY (the shared secret), APPEVENTS_USER_TOKEN_KID (its
// kid in appevents' user_tokens.keys), APPEVENTS_USER_TOKEN_AUDIENCE (default "appevents").
// Prints the token; open the portal with /portal/<user>?token=<token>.
"use strict";

const crypto = require("node:crypto");
const jwt = require("jsonwebtoken");

function mint(userId, key, kid, audience = "appevents") {
  return jwt.sign({ sub: userId, jti: crypto.randomUUID() }, key, {
    algorithm: "HS256",
    keyid: kid,
    audience,
    expiresIn: "5m", // short-lived: appevents refuses more than user_tokens.max_lifetime
  });
}

if (require.main === module) {
  const userId = process.argv[2];
  if (!userId) {
    console.error("usage: node mint.js USER_ID");
    process.exit(2);
  }
  console.log(
    mint(
      userId,
      process.env.APPEVENTS_USER_TOKEN_KEY,
      process.env.APPEVENTS_USER_TOKEN_KID,
      process.env.APPEVENTS_USER_TOKEN_AUDIENCE || "appevents",
    ),
  );
}

module.exports = { mint };
