//! Value types that parse rather than validate: once built, a value is known to be valid; and
//! [`Secret`], which never prints.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// A value that must never be printed or logged: a password hash, the hash of a refresh token.
/// It is stored as the bare string (events keep their shape), and its `Debug` prints `REDACTED`,
/// so an aggregate, command or event printed with `{:?}` gives nothing away.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for the code that must use it (verifying, comparing, storing).
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether there is no value (an account whose password was removed).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forgets the value.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("REDACTED")
    }
}

/// Why a value was refused; the message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

/// Whether `c` is invisible or changes the direction of the text around it: every format
/// character (general category Cf: zero-width spaces and joiners, the byte-order mark, word
/// joiners, bidirectional marks, embeddings, overrides and isolates, …), and the Hangul fillers
/// and the combining grapheme joiner, which draw nothing either. Such characters make two strings
/// that look the same compare different, so identities refuse them.
#[must_use]
pub fn is_invisible(c: char) -> bool {
    c.general_category() == GeneralCategory::Format
        || matches!(c, '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}')
}

/// Raw input longer than this many bytes is refused before it is normalised (NFKC can expand a
/// string, and nothing this long is a valid email or name).
const MAX_RAW_BYTES: usize = 1024;

/// `raw` in Unicode normalisation form NFKC, trimmed: compatibility variants (full-width letters,
/// ligatures, the ideographic space, …) become the characters they stand for, so look-alikes
/// compare equal.
fn nfkc_trimmed(raw: &str) -> String {
    let normalised: String = raw.nfkc().collect();
    normalised.trim().to_owned()
}

/// An email address in NFKC, trimmed and lower-cased, so one mailbox is one account whatever its
/// case or its width (`ＡＤＡ@ｅｘａｍｐｌｅ.ｃｏｍ` is `ada@example.com`). Invisible and
/// direction-changing characters ([`is_invisible`]) are refused rather than removed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Parses an address: one `@`, a non-empty local part, a dotted domain, at most 254 bytes,
    /// after normalisation; no spaces, control, invisible or direction-changing characters.
    ///
    /// # Errors
    /// A [`ValueError`] saying what is wrong.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        if raw.len() > MAX_RAW_BYTES {
            return Err(ValueError("email is longer than 254 characters".into()));
        }
        if raw.chars().any(is_invisible) {
            return Err(ValueError("email must not contain invisible or direction-changing characters".into()));
        }
        // Lower-casing can leave a string that is not in NFKC (a dotted capital I becomes `i` and
        // a combining dot), so it is normalised again.
        let email: String = nfkc_trimmed(raw).to_lowercase().nfkc().collect();
        if email.is_empty() {
            return Err(ValueError("email is required".into()));
        }
        if email.chars().any(is_invisible) {
            return Err(ValueError("email must not contain invisible or direction-changing characters".into()));
        }
        if email.len() > 254 {
            return Err(ValueError("email is longer than 254 characters".into()));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(ValueError("email must contain '@'".into()));
        };
        let domain_ok = !domain.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..");
        if local.is_empty() || local.len() > 64 || !domain_ok {
            return Err(ValueError("email is not a valid address".into()));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ValueError("email must not contain spaces".into()));
        }
        Ok(Self(email))
    }

    /// The normalised address.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name in NFKC: 1 to 100 characters after trimming, no control, invisible or
/// direction-changing characters (a right-to-left override would make a name read as another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DisplayName(String);

impl DisplayName {
    /// Parses a display name.
    ///
    /// # Errors
    /// A [`ValueError`] when empty, too long or holding control, invisible or direction-changing
    /// characters.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        if raw.len() > MAX_RAW_BYTES {
            return Err(ValueError("display_name is longer than 100 characters".into()));
        }
        if raw.chars().any(is_invisible) {
            return Err(ValueError("display_name must not contain invisible or direction-changing characters".into()));
        }
        let name = nfkc_trimmed(raw);
        if name.is_empty() {
            return Err(ValueError("display_name is required".into()));
        }
        if name.chars().count() > 100 {
            return Err(ValueError("display_name is longer than 100 characters".into()));
        }
        if name.chars().any(char::is_control) {
            return Err(ValueError("display_name must not contain control characters".into()));
        }
        if name.chars().any(is_invisible) {
            return Err(ValueError("display_name must not contain invisible or direction-changing characters".into()));
        }
        Ok(Self(name))
    }

    /// The name, normalised and trimmed.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A role name: 1 to 64 of `a-z`, `0-9`, `_`, `-`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoleName(String);

impl RoleName {
    /// Parses a role name.
    ///
    /// # Errors
    /// A [`ValueError`] when the name has other characters or the wrong length.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let ok = (1..=64).contains(&raw.len())
            && raw.starts_with(|c: char| c.is_ascii_lowercase())
            && raw.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ValueError("role must be 1-64 characters of a-z, 0-9, '_' or '-', starting with a letter".into()))
        }
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Refuses raw text longer than `max_chars` characters could ever be in bytes (4 bytes a
/// character), before anything else is done with it.
fn bounded_raw(raw: &str, field: &str, max_chars: usize) -> Result<(), ValueError> {
    if raw.len() > max_chars.saturating_mul(4).saturating_add(MAX_RAW_BYTES) {
        return Err(ValueError(format!("{field} is longer than {max_chars} characters")));
    }
    Ok(())
}

/// A room's name: 1 to 100 characters after trimming, no control characters. Kept as typed
/// (not normalised): a name is shown, never compared as an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoomName(String);

impl RoomName {
    /// Parses a room name.
    ///
    /// # Errors
    /// A [`ValueError`] when empty, longer than 100 characters or holding control characters.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        bounded_raw(raw, "name", 100)?;
        let name = raw.trim();
        if name.is_empty() {
            return Err(ValueError("name is required".into()));
        }
        if name.chars().count() > 100 {
            return Err(ValueError("name is longer than 100 characters".into()));
        }
        if name.chars().any(char::is_control) {
            return Err(ValueError("name must not contain control characters".into()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name, trimmed.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A room's topic: up to 500 characters after trimming, no control characters but newline and
/// tab. An empty topic is no topic ([`Topic::parse`] gives `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Topic(String);

impl Topic {
    /// Parses a topic; blank means none.
    ///
    /// # Errors
    /// A [`ValueError`] when longer than 500 characters or holding control characters.
    pub fn parse(raw: &str) -> Result<Option<Self>, ValueError> {
        bounded_raw(raw, "topic", 500)?;
        let topic = raw.trim();
        if topic.is_empty() {
            return Ok(None);
        }
        if topic.chars().count() > 500 {
            return Err(ValueError("topic is longer than 500 characters".into()));
        }
        if topic.chars().any(is_forbidden_in_text) {
            return Err(ValueError("topic must not contain control characters other than newline and tab".into()));
        }
        Ok(Some(Self(topic.to_owned())))
    }

    /// The topic, trimmed.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The longest message body, in characters (not bytes).
pub const MAX_MESSAGE_CHARS: usize = 4_000;

/// Control characters other than newline and tab: what free text refuses.
fn is_forbidden_in_text(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// A message's text: 1 to 4,000 characters after trimming, no control characters but newline
/// and tab. Stored exactly as given after trimming: never escaped, never interpreted (HTML is
/// text like any other; escaping is the renderer's job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageBody(String);

impl MessageBody {
    /// Parses a message body.
    ///
    /// # Errors
    /// A [`ValueError`] when blank, longer than 4,000 characters or holding control characters
    /// other than newline and tab.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        bounded_raw(raw, "body", MAX_MESSAGE_CHARS)?;
        let body = raw.trim();
        if body.is_empty() {
            return Err(ValueError("body is required".into()));
        }
        if body.chars().count() > MAX_MESSAGE_CHARS {
            return Err(ValueError(format!("body is longer than {MAX_MESSAGE_CHARS} characters")));
        }
        if body.chars().any(is_forbidden_in_text) {
            return Err(ValueError("body must not contain control characters other than newline and tab".into()));
        }
        Ok(Self(body.to_owned()))
    }

    /// The text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_normalised_to_lower_case() {
        assert_eq!(Email::parse("  Ada@Example.COM ").map(|e| e.0), Ok("ada@example.com".into()));
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@example..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn full_width_and_compatibility_forms_are_the_plain_address() {
        let plain = Email::parse("victim@x.com").map(|e| e.0);
        assert_eq!(plain, Ok("victim@x.com".into()));
        for look_alike in [
            "\u{FF56}\u{FF49}\u{FF43}\u{FF54}\u{FF49}\u{FF4D}@\u{FF58}.\u{FF43}\u{FF4F}\u{FF4D}", // ｖｉｃｔｉｍ@ｘ.ｃｏｍ
            "\u{FF36}ICTIM@X.COM",          // full-width capital V
            "victim\u{FF20}x\u{FF0E}com",   // full-width @ and .
            "\u{3000}victim@x.com\u{3000}", // ideographic spaces
        ] {
            assert_eq!(Email::parse(look_alike).map(|e| e.0), plain, "{look_alike:?}");
        }
        // Ligatures decompose: `ﬁ` is `fi`.
        assert_eq!(Email::parse("\u{FB01}nn@x.com").map(|e| e.0), Ok("finn@x.com".into()));
    }

    #[test]
    fn invisible_and_bidi_characters_are_refused_in_emails() {
        for c in [
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{200E}',
            '\u{200F}',
            '\u{202A}',
            '\u{202B}',
            '\u{202C}',
            '\u{202D}',
            '\u{202E}',
            '\u{2060}',
            '\u{2061}',
            '\u{2062}',
            '\u{2063}',
            '\u{2064}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{061C}',
            '\u{180E}',
            '\u{E0041}',
        ] {
            for bad in [format!("vic{c}tim@x.com"), format!("{c}victim@x.com"), format!("victim@x.com{c}")] {
                let refused = Email::parse(&bad);
                assert_eq!(
                    refused,
                    Err(ValueError("email must not contain invisible or direction-changing characters".into())),
                    "{bad:?}"
                );
            }
        }
    }

    #[test]
    fn display_names_are_normalised_and_refuse_invisible_and_bidi_characters() {
        assert_eq!(DisplayName::parse("\u{FF21}da").map(|d| d.0), Ok("Ada".into()));
        for bad in ["Ada\u{202E}nimda", "\u{200F}Ada", "A\u{200B}da", "\u{FEFF}Ada", "Ada\u{2066}x\u{2069}", "\u{3164}"]
        {
            assert_eq!(
                DisplayName::parse(bad),
                Err(ValueError("display_name must not contain invisible or direction-changing characters".into())),
                "{bad:?}"
            );
        }
        // Right-to-left scripts themselves are welcome.
        assert!(DisplayName::parse("\u{05E9}\u{05DC}\u{05D5}\u{05DD}").is_ok());
        assert!(DisplayName::parse("\u{0645}\u{0631}\u{064A}\u{0645}").is_ok());
    }

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(DisplayName::parse(" Ada ").map(|d| d.0), Ok("Ada".into()));
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse(&"x".repeat(101)).is_err());
        assert!(DisplayName::parse("a\u{0}b").is_err());
    }

    #[test]
    fn role_names_are_restricted() {
        assert!(RoleName::parse("operator").is_ok());
        assert!(RoleName::parse("Admin").is_err());
        assert!(RoleName::parse("1st").is_err());
        assert!(RoleName::parse("").is_err());
    }
    #[test]
    fn message_bodies_are_trimmed_bounded_in_characters_and_kept_verbatim() {
        let at_limit = "é".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(MessageBody::parse(&at_limit).map(MessageBody::into_string), Ok(at_limit.clone()));
        assert_eq!(
            MessageBody::parse(&"x".repeat(MAX_MESSAGE_CHARS + 1)),
            Err(ValueError("body is longer than 4000 characters".into()))
        );
        // The limit is on characters after trimming: padding around 4,000 characters is fine.
        assert!(MessageBody::parse(&format!("  {}\n ", "x".repeat(MAX_MESSAGE_CHARS))).is_ok());
        for blank in ["", "  ", "\n\t \n"] {
            assert_eq!(MessageBody::parse(blank), Err(ValueError("body is required".into())), "{blank:?}");
        }
        for bad in ["\u{0007}", "a\u{0000}b", "a\rb", "x\u{001b}[31m", "a\u{0085}b"] {
            assert_eq!(
                MessageBody::parse(bad),
                Err(ValueError("body must not contain control characters other than newline and tab".into())),
                "{bad:?}"
            );
        }
        for verbatim in
            ["<b>x</b>", "<script>alert(1)</script>", "a &amp; b", "line one\n\tline two", "\u{05E9}\u{05DC}"]
        {
            assert_eq!(MessageBody::parse(verbatim).map(MessageBody::into_string), Ok(verbatim.to_owned()));
        }
        assert_eq!(MessageBody::parse("  hi \n").map(MessageBody::into_string), Ok("hi".to_owned()));
    }

    #[test]
    fn room_names_are_trimmed_and_bounded() {
        assert_eq!(RoomName::parse("  general ").map(|n| n.0), Ok("general".into()));
        assert!(RoomName::parse(&"n".repeat(100)).is_ok());
        assert_eq!(RoomName::parse(&"n".repeat(101)), Err(ValueError("name is longer than 100 characters".into())));
        assert_eq!(RoomName::parse("   "), Err(ValueError("name is required".into())));
        assert!(RoomName::parse("a\nb").is_err());
        assert!(RoomName::parse("a\u{0007}").is_err());
        assert_eq!(RoomName::parse("<i>dev</i>").map(|n| n.0), Ok("<i>dev</i>".into()));
    }

    #[test]
    fn topics_may_be_empty_and_are_bounded() {
        assert_eq!(Topic::parse("  "), Ok(None));
        assert_eq!(Topic::parse(" talk\nabout x "), Ok(Some(Topic("talk\nabout x".into()))));
        assert!(Topic::parse(&"t".repeat(500)).is_ok());
        assert_eq!(Topic::parse(&"t".repeat(501)), Err(ValueError("topic is longer than 500 characters".into())));
        assert!(Topic::parse("a\u{0000}").is_err());
    }
}

/// A file's original name, sanitised rather than refused: whatever a client sends as a multipart
/// filename, what is kept is safe to show and to put in a `Content-Disposition` header. Only the
/// last path component is kept (after `/` or `\`), control characters (NUL, CR, LF…) and
/// invisible format characters are dropped, the result is trimmed of spaces and dots, cut to
/// 255 characters keeping the extension, and an empty or all-dots result becomes `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileName(String);

/// The longest file name kept, in characters.
pub const FILE_NAME_MAX_CHARS: usize = 255;

impl FileName {
    /// Sanitises `raw` (never fails).
    #[must_use]
    pub fn sanitise(raw: &str) -> Self {
        let last = raw.rsplit(['/', '\\']).next().unwrap_or_default();
        let cleaned: String =
            last.chars().filter(|c| !c.is_control() && c.general_category() != GeneralCategory::Format).collect();
        let trimmed = cleaned.trim_matches(|c: char| c.is_whitespace() || c == '.');
        let mut name = if trimmed.is_empty() { "file".to_owned() } else { trimmed.to_owned() };
        if name.chars().count() > FILE_NAME_MAX_CHARS {
            // Keep a short extension (up to 16 characters) and cut the stem.
            let extension = name
                .rsplit_once('.')
                .map(|(_, ext)| ext)
                .filter(|ext| !ext.is_empty() && ext.chars().count() <= 16)
                .map(|ext| format!(".{ext}"))
                .unwrap_or_default();
            let keep = FILE_NAME_MAX_CHARS - extension.chars().count();
            let stem: String = name.chars().take(keep).collect();
            name = format!("{}{extension}", stem.trim_end_matches(|c: char| c.is_whitespace() || c == '.'));
        }
        Self(name)
    }

    /// The sanitised name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The sanitised name, owned.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod file_name_tests {
    use super::*;

    #[test]
    fn only_the_last_path_component_is_kept() {
        assert_eq!(FileName::sanitise("../../etc/passwd").as_str(), "passwd");
        assert_eq!(FileName::sanitise("C:\\Users\\ada\\report.pdf").as_str(), "report.pdf");
        assert_eq!(FileName::sanitise("a/b/").as_str(), "file");
    }

    #[test]
    fn control_and_format_characters_are_dropped() {
        assert_eq!(FileName::sanitise("evil\0name\r\n.txt").as_str(), "evilname.txt");
        assert_eq!(FileName::sanitise("in\u{202e}voice.pdf").as_str(), "invoice.pdf");
    }

    #[test]
    fn empty_and_dot_names_become_file() {
        assert_eq!(FileName::sanitise("").as_str(), "file");
        assert_eq!(FileName::sanitise("..").as_str(), "file");
        assert_eq!(FileName::sanitise("  . ").as_str(), "file");
    }

    #[test]
    fn long_names_are_cut_keeping_the_extension() {
        let long = format!("{}.png", "a".repeat(1000));
        let name = FileName::sanitise(&long);
        assert_eq!(name.as_str().chars().count(), FILE_NAME_MAX_CHARS);
        assert!(name.as_str().ends_with(".png"));
        let no_ext = "b".repeat(1000);
        assert_eq!(FileName::sanitise(&no_ext).as_str().chars().count(), FILE_NAME_MAX_CHARS);
    }
}
