//! Every mail the worker sends, in one place: subject, plain-text body and HTML body.
//!
//! Plain Rust formatting, no template engine: the mails are few and short, and the compiler checks
//! every placeholder. Anything that came from a user (the display name) or from configuration (the
//! links) is HTML-escaped in the HTML body.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// The product name the mails speak for.
const PRODUCT: &str = "cairn";

/// One rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// The subject line (never holds user input).
    pub subject: String,
    /// The `text/plain` alternative.
    pub text: String,
    /// The `text/html` alternative.
    pub html: String,
}

/// The welcome mail after registration, carrying the verification link.
pub fn welcome(name: &str, verify_link: &str, valid_for: Duration) -> Mail {
    let valid = human(valid_for);
    let subject = format!("Welcome to {PRODUCT}: please verify your email address");
    let text = format!(
        "Hello {name},\n\n\
         welcome to {PRODUCT}! Please confirm that this is your email address by opening this link:\n\n\
         {verify_link}\n\n\
         The link is valid for {valid} and works once.\n\n\
         If you did not create an account, ignore this mail: nothing happens without the link.\n"
    );
    let html = page(
        &subject,
        &[
            paragraph(&format!("Hello {},", escape(name))),
            paragraph(&format!("welcome to {PRODUCT}! Please confirm that this is your email address.")),
            button(verify_link, "Verify my email address"),
            link_fallback(verify_link),
            paragraph(&format!("The link is valid for {valid} and works once.")),
            paragraph("If you did not create an account, ignore this mail: nothing happens without the link."),
        ],
    );
    Mail { subject, text, html }
}

/// A new verification link, asked for again.
pub fn verify_email(name: &str, verify_link: &str, valid_for: Duration) -> Mail {
    let valid = human(valid_for);
    let subject = "Verify your email address".to_owned();
    let text = format!(
        "Hello {name},\n\n\
         please confirm that this is your email address by opening this link:\n\n\
         {verify_link}\n\n\
         The link is valid for {valid} and works once.\n\n\
         If you did not ask for it, ignore this mail.\n"
    );
    let html = page(
        &subject,
        &[
            paragraph(&format!("Hello {},", escape(name))),
            paragraph("please confirm that this is your email address."),
            button(verify_link, "Verify my email address"),
            link_fallback(verify_link),
            paragraph(&format!("The link is valid for {valid} and works once.")),
            paragraph("If you did not ask for it, ignore this mail."),
        ],
    );
    Mail { subject, text, html }
}

/// The password-reset link.
pub fn reset_password(name: &str, reset_link: &str, valid_for: Duration) -> Mail {
    let valid = human(valid_for);
    let subject = format!("Reset your {PRODUCT} password");
    let text = format!(
        "Hello {name},\n\n\
         someone (we hope you) asked to reset the password of your {PRODUCT} account. Choose a new \
         password here:\n\n\
         {reset_link}\n\n\
         The link is valid for {valid} and works once. Setting a new password signs you out everywhere.\n\n\
         If you did not ask for it, ignore this mail: your password stays as it is.\n"
    );
    let html = page(
        &subject,
        &[
            paragraph(&format!("Hello {},", escape(name))),
            paragraph(&format!("someone (we hope you) asked to reset the password of your {PRODUCT} account.")),
            button(reset_link, "Choose a new password"),
            link_fallback(reset_link),
            paragraph(&format!(
                "The link is valid for {valid} and works once. Setting a new password signs you out everywhere."
            )),
            paragraph("If you did not ask for it, ignore this mail: your password stays as it is."),
        ],
    );
    Mail { subject, text, html }
}

/// Confirmation that the address is verified.
pub fn email_verified(name: &str) -> Mail {
    let subject = "Your email address is verified".to_owned();
    let text = format!(
        "Hello {name},\n\n\
         your email address is verified. Thank you, and welcome to {PRODUCT}!\n"
    );
    let html = page(
        &subject,
        &[
            paragraph(&format!("Hello {},", escape(name))),
            paragraph(&format!("your email address is verified. Thank you, and welcome to {PRODUCT}!")),
        ],
    );
    Mail { subject, text, html }
}

/// How a password came to change, for the security notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordChange {
    /// Changed by a signed-in user.
    Changed,
    /// Set through a reset link.
    Reset,
}

/// Security notice after a password change or reset.
pub fn password_changed(
    name: &str,
    how: PasswordChange,
    when: DateTime<Utc>,
    client_ip: Option<&str>,
    reset_page: &str,
) -> Mail {
    let subject = format!("Your {PRODUCT} password was changed");
    let what = match how {
        PasswordChange::Changed => "was changed",
        PasswordChange::Reset => "was reset with a link sent to this address",
    };
    let when = when.format("%Y-%m-%d %H:%M UTC").to_string();
    let from = client_ip.map(|ip| format!(" from {ip}")).unwrap_or_default();
    let text = format!(
        "Hello {name},\n\n\
         the password of your {PRODUCT} account {what} on {when}{from}. Your other sessions were signed out.\n\n\
         If this was you, there is nothing to do.\n\n\
         If this wasn't you, reset your password now:\n\n\
         {reset_page}\n"
    );
    let html = page(
        &subject,
        &[
            paragraph(&format!("Hello {},", escape(name))),
            paragraph(&format!(
                "the password of your {PRODUCT} account {what} on {}{}. Your other sessions were signed out.",
                escape(&when),
                escape(&from)
            )),
            paragraph("If this was you, there is nothing to do."),
            paragraph("<strong>If this wasn't you, reset your password now:</strong>"),
            button(reset_page, "Reset my password"),
            link_fallback(reset_page),
        ],
    );
    Mail { subject, text, html }
}

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "24 hours", "30 minutes": how long a link lasts, in words.
fn human(d: Duration) -> String {
    let minutes = d.as_secs() / 60;
    let plural = |n: u64, unit: &str| if n == 1 { format!("1 {unit}") } else { format!("{n} {unit}s") };
    if minutes >= 60 && minutes % 60 == 0 {
        plural(minutes / 60, "hour")
    } else {
        plural(minutes, "minute")
    }
}

/// The HTML document around the blocks (already HTML). Inline styles only: mail clients drop `<style>`.
fn page(subject: &str, blocks: &[String]) -> String {
    let mut body = String::new();
    for block in blocks {
        let _ = writeln!(body, "{block}");
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n</head>\n\
         <body style=\"margin:0;padding:24px;background:#f6f6f6;\
         font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:16px;line-height:1.5;color:#222;\">\n\
         <div style=\"max-width:560px;margin:0 auto;padding:24px;background:#fff;border-radius:8px;\">\n\
         {body}<p style=\"margin:24px 0 0;font-size:13px;color:#777;\">{PRODUCT}</p>\n</div>\n</body>\n</html>\n",
        escape(subject)
    )
}

/// A paragraph of HTML (callers escape what needs it).
fn paragraph(html: &str) -> String {
    format!("<p style=\"margin:0 0 16px;\">{html}</p>")
}

/// The call to action.
fn button(href: &str, label: &str) -> String {
    format!(
        "<p style=\"margin:24px 0;\"><a href=\"{}\" style=\"display:inline-block;padding:12px 20px;background:#2b59c3;\
         color:#fff;text-decoration:none;border-radius:6px;font-weight:600;\">{}</a></p>",
        escape(href),
        escape(label)
    )
}

/// The link written out, for clients that do not show buttons.
fn link_fallback(href: &str) -> String {
    format!(
        "<p style=\"margin:0 0 16px;font-size:13px;color:#555;\">If the button does not work, open this link:<br>\
         <a href=\"{0}\" style=\"color:#2b59c3;word-break:break-all;\">{0}</a></p>",
        escape(href)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_input_is_escaped_in_html_and_kept_in_text() {
        let name = "Ada <script>alert('x')</script> & \"co\"";
        let link = "https://app.example.com/verify-email?token=abc&x=<y>";
        let mail = welcome(name, link, Duration::from_secs(24 * 3600));
        assert!(!mail.html.contains("<script>"));
        assert!(mail.html.contains("Ada &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;co&quot;"));
        assert!(mail.html.contains("href=\"https://app.example.com/verify-email?token=abc&amp;x=&lt;y&gt;\""));
        assert!(mail.text.contains(name) && mail.text.contains(link));
        assert!(mail.text.contains("valid for 24 hours"));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human(Duration::from_secs(24 * 3600)), "24 hours");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
        assert_eq!(human(Duration::from_secs(30 * 60)), "30 minutes");
        assert_eq!(human(Duration::from_secs(90 * 60)), "90 minutes");
    }

    #[test]
    fn every_mail_has_both_bodies_and_no_user_input_in_the_subject() {
        let name = "Mallory\u{202e}";
        let when = DateTime::<Utc>::UNIX_EPOCH;
        for mail in [
            welcome(name, "https://x/verify-email?token=t", Duration::from_secs(60)),
            verify_email(name, "https://x/verify-email?token=t", Duration::from_secs(60)),
            reset_password(name, "https://x/reset-password?token=t", Duration::from_secs(60)),
            email_verified(name),
            password_changed(name, PasswordChange::Changed, when, Some("203.0.113.9"), "https://x/reset-password"),
            password_changed(name, PasswordChange::Reset, when, None, "https://x/reset-password"),
        ] {
            assert!(!mail.subject.contains("Mallory"));
            assert!(mail.text.contains(name) && mail.html.contains(name));
            assert!(mail.html.starts_with("<!DOCTYPE html>"));
        }
    }
}
