//! OAuth 2.0 refresh-token grant (RFC 6749 §6), as Salesforce and HubSpot implement it.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::classify;
use super::{Integrations, read_capped};
use crate::core::connection::Connection;
use crate::core::failure::{Failure, FailureKind};

/// A successful refresh. Providers that rotate refresh tokens send a new one.
pub struct Grant {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
}

pub async fn refresh(
    integrations: &Integrations,
    connection: &Connection,
) -> Result<Grant, Failure> {
    let (Some(refresh_token), Some(token_url)) = (&connection.refresh_token, &connection.token_url)
    else {
        return Err(Failure::new(
            FailureKind::RevokedCredentials,
            "access token rejected and the connection has no refresh token",
        ));
    };
    let mut form = vec![
        ("grant_type", "refresh_token".to_owned()),
        ("refresh_token", refresh_token.expose_secret().to_owned()),
    ];
    if let Some(client_id) = &connection.client_id {
        form.push(("client_id", client_id.clone()));
    }
    if let Some(secret) = &connection.client_secret {
        form.push(("client_secret", secret.expose_secret().to_owned()));
    }
    let response = integrations
        .crm_client()
        .post(token_url)
        .form(&form)
        .send()
        .await
        .map_err(|e| classify::transport(&e))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = read_capped(response, integrations.max_response_bytes()).await?;
    if !(200..300).contains(&status) {
        return Err(classify::token_response(status, &headers, &body));
    }
    let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
        Failure::new(
            FailureKind::Transient,
            "token endpoint answered without an access_token",
        )
    })?;
    Ok(Grant {
        access_token: SecretString::from(answer.access_token),
        refresh_token: answer.refresh_token.map(SecretString::from),
    })
}
