//! The refresh-token cookie (HttpOnly, Secure, SameSite=Strict, scoped to the auth path), the
//! OAuth sign-in cookie that binds a sign-in to the browser that started it (the same, but
//! SameSite=Lax and ten minutes), and the Origin check that keeps cookie-authenticated endpoints
//! safe from CSRF.

use axum::http::{header, HeaderMap, HeaderValue};
use cairn_platform::http::ApiError;
use cookie::{Cookie, SameSite};

/// The cookie's name.
pub const COOKIE_NAME: &str = "cairn_refresh";
/// The OAuth sign-in cookie's name: it holds a hash of the sign-in's `state`.
pub const OAUTH_COOKIE_NAME: &str = "cairn_oauth";
/// The only path the browser sends either cookie to.
pub const COOKIE_PATH: &str = "/api/v1/auth";

/// How the refresh cookie and the OAuth sign-in cookie are written and checked.
#[derive(Debug, Clone)]
pub struct RefreshCookie {
    /// Mark it `Secure` (off only for plain-HTTP development).
    pub secure: bool,
    /// Origins allowed to use it.
    pub allowed_origins: Vec<String>,
}

impl RefreshCookie {
    /// `Set-Cookie` carrying `token` for `max_age_secs`.
    #[must_use]
    pub fn set(&self, token: &str, max_age_secs: i64) -> HeaderValue {
        self.header(COOKIE_NAME, token, SameSite::Strict, max_age_secs)
    }

    /// `Set-Cookie` that deletes it.
    #[must_use]
    pub fn clear(&self) -> HeaderValue {
        self.header(COOKIE_NAME, "", SameSite::Strict, 0)
    }

    /// `Set-Cookie` of the OAuth sign-in cookie carrying `binding` for `max_age_secs`. Lax, not
    /// Strict: the browser arrives at the frontend's callback page from the provider's site.
    #[must_use]
    pub fn set_oauth(&self, binding: &str, max_age_secs: i64) -> HeaderValue {
        self.header(OAUTH_COOKIE_NAME, binding, SameSite::Lax, max_age_secs)
    }

    /// `Set-Cookie` that deletes the OAuth sign-in cookie.
    #[must_use]
    pub fn clear_oauth(&self) -> HeaderValue {
        self.header(OAUTH_COOKIE_NAME, "", SameSite::Lax, 0)
    }

    fn header(&self, name: &'static str, value: &str, same_site: SameSite, max_age_secs: i64) -> HeaderValue {
        let cookie = Cookie::build((name, value.to_owned()))
            .path(COOKIE_PATH)
            .http_only(true)
            .secure(self.secure)
            .same_site(same_site)
            .max_age(cookie::time::Duration::seconds(max_age_secs.max(0)))
            .build();
        HeaderValue::from_str(&cookie.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The refresh token from the request's cookies, if any.
    #[must_use]
    pub fn read(headers: &HeaderMap) -> Option<String> {
        read_cookie(headers, COOKIE_NAME)
    }

    /// The OAuth sign-in cookie from the request's cookies, if any.
    #[must_use]
    pub fn read_oauth(headers: &HeaderMap) -> Option<String> {
        read_cookie(headers, OAUTH_COOKIE_NAME)
    }

    /// A request authenticated by the cookie must come from an allowed origin.
    ///
    /// # Errors
    /// FORBIDDEN when `Origin` is missing or not allowed.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(|o| o.trim_end_matches('/'));
        match origin {
            Some(origin) if self.allowed_origins.iter().any(|allowed| allowed == origin) => Ok(()),
            Some(_) => {
                Err(ApiError::Forbidden("requests with the session cookie must come from an allowed origin".to_owned()))
            }
            None => Err(ApiError::Forbidden("requests with the session cookie must carry an Origin header".to_owned())),
        }
    }
}

fn read_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name && !c.value().is_empty())
        .map(|c| c.value().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_http_only_strict_and_scoped() {
        let cookie = RefreshCookie { secure: true, allowed_origins: vec![] };
        let text = cookie.set("abc", 60).to_str().map(str::to_owned).unwrap_or_default();
        for part in ["cairn_refresh=abc", "HttpOnly", "Secure", "SameSite=Strict", "Path=/api/v1/auth", "Max-Age=60"] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
    }

    #[test]
    fn the_oauth_cookie_is_http_only_lax_scoped_and_secure_when_configured() {
        let text = |secure: bool| {
            let cookie = RefreshCookie { secure, allowed_origins: vec![] };
            cookie.set_oauth("h", 600).to_str().map(str::to_owned).unwrap_or_default()
        };
        let secure = text(true);
        for part in ["cairn_oauth=h", "HttpOnly", "Secure", "SameSite=Lax", "Path=/api/v1/auth", "Max-Age=600"] {
            assert!(secure.contains(part), "{part} missing from {secure}");
        }
        assert!(!text(false).contains("Secure"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("cairn_refresh=tok; cairn_oauth=bound"));
        assert_eq!(RefreshCookie::read_oauth(&headers).as_deref(), Some("bound"));
    }

    #[test]
    fn origins_are_checked() {
        let cookie = RefreshCookie { secure: true, allowed_origins: vec!["https://app.example.com".into()] };
        let mut headers = HeaderMap::new();
        assert!(cookie.check_origin(&headers).is_err());
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example.com"));
        assert!(cookie.check_origin(&headers).is_err());
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://app.example.com"));
        assert!(cookie.check_origin(&headers).is_ok());
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; cairn_refresh=tok; b=2"));
        assert_eq!(RefreshCookie::read(&headers).as_deref(), Some("tok"));
    }
}
