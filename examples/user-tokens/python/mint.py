"""Mint a user token for the appevents Connect Portal, as a product's backend does.

Usage: python mint.py USER_ID
Environment: APPEVENTS_USER_TOKEN_KEY (the shared secret), APPEVENTS_USER_TOKEN_KID (its
kid in appevents' user_tokens.keys), APPEVENTS_USER_TOKEN_AUDIENCE (default "appevents").
Prints the token; open the portal with /portal/<user>?token=<token>.
"""
import os
import sys
import time
import uuid

import jwt  # PyJWT


def mint(user_id: str, key: str, kid: str, audience: str = "appevents", ttl: int = 300) -> str:
    now = int(time.time())
    claims = {
        "sub": user_id,
        "aud": audience,
        "iat": now,
        "exp": now + ttl,  # short-lived: appevents refuses more than user_tokens.max_lifetime
        "jti": uuid.uuid4().hex,  # each token opens one portal session
    }
    return jwt.encode(claims, key, algorithm="HS256", headers={"kid": kid})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: mint.py USER_ID")
    print(
        mint(
            sys.argv[1],
            key=os.environ["APPEVENTS_USER_TOKEN_KEY"],
            kid=os.environ["APPEVENTS_USER_TOKEN_KID"],
            audience=os.environ.get("APPEVENTS_USER_TOKEN_AUDIENCE", "appevents"),
        )
    )
