//! The provider side of the flow: authorization URLs, code exchange, identity checks.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use cairn_platform::http::ApiError;
use cairn_platform::secrets::{hash_token, random_token};
use cairn_platform::settings::{OAuthKind, OAuthProvider};
use serde::Deserialize;
use sqlx::PgPool;

/// How long a started sign-in may take (and its browser cookie lives).
pub const STATE_TTL_SECS: i64 = 600;

/// The configured providers.
#[derive(Clone)]
pub struct OAuth {
    providers: HashMap<String, OAuthProvider>,
    redirect_uri: String,
    http: reqwest::Client,
    pool: PgPool,
}

/// How the client starting a sign-in will prove, at the callback, that it is the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartMode {
    /// A browser: cairn keeps the PKCE verifier, and the flow is bound to a cookie holding a
    /// hash of the state.
    Browser,
    /// A native client with its own PKCE pair: cairn forwards its challenge (S256) to the
    /// provider, and the client presents the verifier at the callback.
    Native {
        /// The client's S256 challenge: base64url (no padding) of the verifier's SHA-256.
        code_challenge: String,
    },
}

/// A started sign-in.
#[derive(Debug)]
pub struct Started {
    /// Where to send the user.
    pub authorize_url: String,
    /// The `state` the provider will hand back.
    pub state: String,
    /// Browser sign-ins: the value of the cookie that binds the flow to this browser.
    pub browser_binding: Option<String>,
}

/// What the callback presents to show it comes from the client that started the sign-in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Proof<'a> {
    /// The browser's sign-in cookie, if it sent one.
    pub cookie: Option<&'a str>,
    /// A native client's PKCE verifier, if it sent one.
    pub code_verifier: Option<&'a str>,
}

/// The cookie value binding `state` to a browser: the state's SHA-256, in hex.
fn binding_of(state: &str) -> String {
    hash_token(state)
}

/// The S256 PKCE challenge of `verifier`.
fn challenge_of(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()))
}

/// A verified identity from a provider.
#[derive(Debug)]
pub struct Identity {
    /// The verified email address.
    pub email: String,
    /// A display name, if the provider gave one.
    pub name: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct IdClaims {
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    nonce: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct GithubUser {
    name: Option<String>,
    login: Option<String>,
}

#[derive(Deserialize)]
struct GithubEmail {
    email: String,
    primary: bool,
    verified: bool,
}

fn upstream(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::ServiceUnavailable(format!("oauth provider {what}: {e}"))
}

impl OAuth {
    /// The providers of `providers`, returning users to `redirect_uri`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(pool: PgPool, providers: &[OAuthProvider], redirect_uri: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).user_agent("cairn").build()?;
        Ok(Self {
            providers: providers.iter().map(|p| (p.name.clone(), p.clone())).collect(),
            redirect_uri: redirect_uri.to_owned(),
            http,
            pool,
        })
    }

    fn provider(&self, name: &str) -> Result<&OAuthProvider, ApiError> {
        self.providers.get(name).ok_or_else(|| ApiError::NotFound(format!("no OAuth provider '{name}' is configured")))
    }

    /// Starts a sign-in: stores a fresh state and nonce, with the PKCE verifier (a browser) or
    /// the client's own PKCE challenge (a native client), and returns the URL to send the user to.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown provider; 503 when Postgres is down.
    pub async fn start(&self, name: &str, mode: StartMode) -> Result<Started, ApiError> {
        let provider = self.provider(name)?;
        let (state, nonce) = (random_token()?, random_token()?);
        let (verifier, client_challenge, challenge) = match mode {
            StartMode::Browser => {
                let verifier = random_token()?;
                let challenge = challenge_of(&verifier);
                (Some(verifier), None, challenge)
            }
            StartMode::Native { code_challenge } => (None, Some(code_challenge.clone()), code_challenge),
        };
        sqlx::query(
            "INSERT INTO oauth_states (state, provider, code_verifier, client_challenge, nonce, expires_at) \
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))",
        )
        .bind(&state)
        .bind(name)
        .bind(&verifier)
        .bind(&client_challenge)
        .bind(&nonce)
        .bind(STATE_TTL_SECS as f64)
        .execute(&self.pool)
        .await?;
        // Expired states are of no use to anyone.
        sqlx::query("DELETE FROM oauth_states WHERE expires_at < now()").execute(&self.pool).await?;
        let mut url = reqwest::Url::parse(&provider.authorize_url).map_err(|e| ApiError::Internal(e.into()))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &provider.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", &provider.scopes)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if provider.kind == OAuthKind::Oidc {
            url.query_pairs_mut().append_pair("nonce", &nonce);
        }
        let browser_binding = verifier.is_some().then(|| binding_of(&state));
        Ok(Started { authorize_url: url.to_string(), state, browser_binding })
    }

    /// Finishes a sign-in: spends the state (once) if `proof` shows the caller is the client
    /// that started it, exchanges the code with the PKCE verifier, and returns the provider's
    /// verified identity. A state whose proof fails is not spent.
    ///
    /// # Errors
    /// VALIDATION_FAILED for an unknown, spent or expired state, or a native sign-in without its
    /// `code_verifier`; UNAUTHENTICATED when the proof does not match (another browser, another
    /// app) or the provider's answer does not prove a verified email (bad signature, issuer,
    /// audience or nonce); 503 when the provider cannot be reached.
    pub async fn finish(&self, name: &str, code: &str, state: &str, proof: Proof<'_>) -> Result<Identity, ApiError> {
        let provider = self.provider(name)?;
        let cookie_matches = proof.cookie.is_some_and(|cookie| cookie == binding_of(state));
        let presented_challenge = proof.code_verifier.map(challenge_of);
        // The proof is checked in the statement that spends the state: a state is spent once,
        // and only by the client that started it.
        let row: Option<(Option<String>, String)> = sqlx::query_as(
            "DELETE FROM oauth_states WHERE state = $1 AND provider = $2 AND expires_at > now() \
               AND CASE WHEN client_challenge IS NULL THEN $3 ELSE client_challenge = $4 END \
             RETURNING code_verifier, nonce",
        )
        .bind(state)
        .bind(name)
        .bind(cookie_matches)
        .bind(&presented_challenge)
        .fetch_optional(&self.pool)
        .await?;
        let Some((stored_verifier, nonce)) = row else { return Err(self.refusal(name, state, proof).await) };
        let verifier = match (stored_verifier, proof.code_verifier) {
            (Some(stored), _) => stored,
            (None, Some(presented)) => presented.to_owned(),
            (None, None) => return Err(ApiError::field("code_verifier", "is required")),
        };
        let answer = self
            .http
            .post(&provider.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.redirect_uri),
                ("client_id", &provider.client_id),
                ("client_secret", &provider.client_secret),
                ("code_verifier", &verifier),
            ])
            .send()
            .await
            .map_err(|e| upstream("token endpoint", e))?;
        if !answer.status().is_success() {
            return Err(ApiError::Unauthenticated(format!("the provider refused the code ({})", answer.status())));
        }
        let tokens: TokenAnswer = answer.json().await.map_err(|e| upstream("token answer", e))?;
        match provider.kind {
            OAuthKind::Oidc => self.verify_id_token(provider, tokens.id_token.as_deref(), &nonce).await,
            OAuthKind::Github => self.github_identity(provider, &tokens.access_token).await,
        }
    }

    /// Why a state was not spent: unknown, or started by another browser or app.
    async fn refusal(&self, name: &str, state: &str, proof: Proof<'_>) -> ApiError {
        let native: Result<Option<bool>, sqlx::Error> = sqlx::query_scalar(
            "SELECT client_challenge IS NOT NULL FROM oauth_states \
             WHERE state = $1 AND provider = $2 AND expires_at > now()",
        )
        .bind(state)
        .bind(name)
        .fetch_optional(&self.pool)
        .await;
        match native {
            Err(e) => e.into(),
            Ok(None) => ApiError::field("state", "is unknown, expired or already used"),
            Ok(Some(false)) if proof.cookie.is_none() => ApiError::Unauthenticated(
                "this sign-in was started in another browser (its sign-in cookie is missing): start it again here"
                    .to_owned(),
            ),
            Ok(Some(false)) => ApiError::Unauthenticated(
                "this sign-in was started in another browser (the sign-in cookie is for another sign-in): \
                 start it again here"
                    .to_owned(),
            ),
            Ok(Some(true)) if proof.code_verifier.is_none() => {
                ApiError::field("code_verifier", "is required: this sign-in was started with a code_challenge")
            }
            Ok(Some(true)) => ApiError::Unauthenticated(
                "code_verifier does not match the code_challenge this sign-in was started with".to_owned(),
            ),
        }
    }

    async fn verify_id_token(
        &self,
        provider: &OAuthProvider,
        id_token: Option<&str>,
        nonce: &str,
    ) -> Result<Identity, ApiError> {
        let refused = |why: &str| ApiError::Unauthenticated(format!("the provider's identity was not accepted: {why}"));
        let id_token = id_token.ok_or_else(|| refused("no ID token"))?;
        let header = jsonwebtoken::decode_header(id_token).map_err(|_| refused("malformed ID token"))?;
        let jwks: jsonwebtoken::jwk::JwkSet = self
            .http
            .get(&provider.jwks_url)
            .send()
            .await
            .map_err(|e| upstream("keys", e))?
            .json()
            .await
            .map_err(|e| upstream("keys", e))?;
        let jwk = match &header.kid {
            Some(kid) => jwks.find(kid),
            None => jwks.keys.first(),
        }
        .ok_or_else(|| refused("signed with an unknown key"))?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|_| refused("unusable key"))?;
        if !matches!(
            header.alg,
            jsonwebtoken::Algorithm::RS256 | jsonwebtoken::Algorithm::ES256 | jsonwebtoken::Algorithm::EdDSA
        ) {
            return Err(refused("algorithm not accepted"));
        }
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_issuer(&[&provider.issuer]);
        validation.set_audience(&[&provider.client_id]);
        let claims =
            jsonwebtoken::decode::<IdClaims>(id_token, &key, &validation).map_err(|e| refused(&e.to_string()))?.claims;
        if claims.nonce.as_deref() != Some(nonce) {
            return Err(refused("nonce does not match"));
        }
        let verified = matches!(claims.email_verified, Some(serde_json::Value::Bool(true)))
            || matches!(&claims.email_verified, Some(serde_json::Value::String(s)) if s == "true");
        match (claims.email, verified) {
            (Some(email), true) => Ok(Identity { email, name: claims.name }),
            _ => Err(ApiError::Forbidden("the provider did not vouch for a verified email address".to_owned())),
        }
    }

    async fn github_identity(&self, provider: &OAuthProvider, access_token: &str) -> Result<Identity, ApiError> {
        let get = |url: &str| {
            self.http
                .get(url)
                .bearer_auth(access_token)
                .header(reqwest::header::ACCEPT, "application/vnd.github+json")
                .send()
        };
        let user: GithubUser = get(&provider.userinfo_url)
            .await
            .map_err(|e| upstream("user", e))?
            .json()
            .await
            .map_err(|e| upstream("user", e))?;
        let emails: Vec<GithubEmail> = get(&provider.emails_url)
            .await
            .map_err(|e| upstream("emails", e))?
            .json()
            .await
            .map_err(|e| upstream("emails", e))?;
        let email =
            emails.into_iter().filter(|e| e.verified).max_by_key(|e| e.primary).ok_or_else(|| {
                ApiError::Forbidden("the provider did not vouch for a verified email address".to_owned())
            })?;
        Ok(Identity { email: email.email, name: user.name.or(user.login) })
    }
}
