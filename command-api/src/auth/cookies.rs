//! The refresh-token cookie (HttpOnly, Secure, SameSite=Strict, scoped to the auth path) and the
//! Origin check that keeps cookie-authenticated endpoints safe from CSRF.

use axum::http::{header, HeaderMap, HeaderValue};
use cairn_platform::http::ApiError;
use cookie::{Cookie, SameSite};

/// The cookie's name.
pub const COOKIE_NAME: &str = "cairn_refresh";
/// The only path the browser sends it to.
pub const COOKIE_PATH: &str = "/api/v1/auth";

/// How the refresh cookie is written and checked.
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
        self.header(Cookie::build((COOKIE_NAME, token.to_owned())), max_age_secs)
    }

    /// `Set-Cookie` that deletes it.
    #[must_use]
    pub fn clear(&self) -> HeaderValue {
        self.header(Cookie::build((COOKIE_NAME, "")), 0)
    }

    fn header(&self, builder: cookie::CookieBuilder<'static>, max_age_secs: i64) -> HeaderValue {
        let cookie = builder
            .path(COOKIE_PATH)
            .http_only(true)
            .secure(self.secure)
            .same_site(SameSite::Strict)
            .max_age(cookie::time::Duration::seconds(max_age_secs.max(0)))
            .build();
        HeaderValue::from_str(&cookie.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The refresh token from the request's cookies, if any.
    #[must_use]
    pub fn read(headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(Cookie::split_parse)
            .filter_map(Result::ok)
            .find(|c| c.name() == COOKIE_NAME && !c.value().is_empty())
            .map(|c| c.value().to_owned())
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
