// Mint a user token for the appevents Connect Portal, as a product's backend does.
//
// Usage: go run . USER_ID
// Environment: APPEVENTS_USER_TOKEN_KEY (the shared secret), APPEVENTS_USER_TOKEN_KID (its
// kid in appevents' user_tokens.keys), APPEVENTS_USER_TOKEN_AUDIENCE (default "appevents").
// Prints the token; open the portal with /portal/<user>?token=<token>.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"time"

	"github.com/golang-jwt/jwt/v4"
)

func mint(userID, key, kid, audience string) (string, error) {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return "", err
	}
	now := time.Now()
	claims := jwt.RegisteredClaims{
		Subject:   userID,
		Audience:  jwt.ClaimStrings{audience},
		IssuedAt:  jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(5 * time.Minute)), // short-lived
		ID:        hex.EncodeToString(id),                        // each token opens one session
	}
	token := jwt.NewWithClaims(jwt.SigningMethodHS256, claims)
	token.Header["kid"] = kid
	return token.SignedString([]byte(key))
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: mint USER_ID")
		os.Exit(2)
	}
	audience := os.Getenv("APPEVENTS_USER_TOKEN_AUDIENCE")
	if audience == "" {
		audience = "appevents"
	}
	token, err := mint(os.Args[1], os.Getenv("APPEVENTS_USER_TOKEN_KEY"), os.Getenv("APPEVENTS_USER_TOKEN_KID"), audience)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(token)
}
