//! What a download's headers say: which bytes a `Range` asks for, whether `If-None-Match` already
//! holds them, and how the browser should present them (`Content-Disposition`).

use cairn_storage::ByteRange;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What a request's `Range` comes to against a file of a known size (RFC 9110 §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No range, one the server ignores (another unit, malformed, several ranges): the whole file.
    Whole,
    /// One satisfiable range: 206 with these bytes.
    Part(ByteRange),
    /// One range outside the file: 416.
    Unsatisfiable,
}

/// Reads `header` (a `Range` value) against a file of `size` bytes. Several ranges are answered
/// with the whole file, as RFC 9110 allows; a header that does not parse is ignored, as it requires.
#[must_use]
pub fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else { return RangeRequest::Whole };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Whole };
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // More digits than a u64 holds: further than any file reaches.
        Some(s.parse().unwrap_or(u64::MAX))
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match number(suffix) {
            None => RangeRequest::Whole,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Part(ByteRange { start: size.saturating_sub(n), end: size - 1 }),
        },
        (start, "") => match number(start) {
            None => RangeRequest::Whole,
            Some(start) if start >= size => RangeRequest::Unsatisfiable,
            Some(start) => RangeRequest::Part(ByteRange { start, end: size - 1 }),
        },
        (start, end) => match (number(start), number(end)) {
            (Some(start), Some(end)) if start <= end => {
                if start >= size {
                    RangeRequest::Unsatisfiable
                } else {
                    RangeRequest::Part(ByteRange { start, end: end.min(size - 1) })
                }
            }
            _ => RangeRequest::Whole,
        },
    }
}

/// The entity tag of a file: its sha256, quoted (a strong validator: the bytes never change).
#[must_use]
pub fn etag(sha256: &str) -> String {
    format!("\"{sha256}\"")
}

/// Whether an `If-None-Match` value names `etag` (or is `*`): compared weakly, as RFC 9110 says
/// for this header, so `W/"…"` matches too.
#[must_use]
pub fn none_match(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// Whether an `If-Range` value lets the range apply: only the file's own entity tag, compared
/// strongly (a date, or another tag, gets the whole file).
#[must_use]
pub fn if_range_holds(header: &str, etag: &str) -> bool {
    header.trim() == etag
}

/// The characters RFC 5987 lets through unencoded in `filename*` (attr-char).
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// `Content-Disposition` for a file named `name`: `inline` when `inline`, else `attachment`, with
/// an ASCII `filename` for old clients (anything else, quotes and backslashes become `_`) and the
/// exact name in `filename*` (RFC 5987, UTF-8).
#[must_use]
pub fn content_disposition(name: &str, inline: bool) -> String {
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    let kind = if inline { "inline" } else { "attachment" };
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{}", utf8_percent_encode(name, ATTR_CHAR))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Part(ByteRange { start, end })
    }

    #[test]
    fn one_range_of_each_form_is_read_against_the_size() {
        assert_eq!(parse_range("bytes=0-9", 100), part(0, 9));
        assert_eq!(parse_range("bytes=90-200", 100), part(90, 99), "the end is clamped");
        assert_eq!(parse_range("bytes=99-99", 100), part(99, 99));
        assert_eq!(parse_range("bytes=40-", 100), part(40, 99));
        assert_eq!(parse_range("bytes=-10", 100), part(90, 99));
        assert_eq!(parse_range("bytes=-500", 100), part(0, 99), "a suffix longer than the file is all of it");
        assert_eq!(parse_range("bytes=0-99999999999999999999999", 100), part(0, 99));
    }

    #[test]
    fn ranges_outside_the_file_are_unsatisfiable() {
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn what_does_not_parse_or_asks_for_several_ranges_gets_the_whole_file() {
        for header in ["items=0-5", "bytes=5-2", "bytes=a-b", "bytes=-", "bytes=0-1,5-6", "bytes=1", "bytes=+1-2"] {
            assert_eq!(parse_range(header, 100), RangeRequest::Whole, "{header}");
        }
    }

    #[test]
    fn if_none_match_compares_weakly_and_if_range_strongly() {
        let tag = etag("ab12");
        assert_eq!(tag, "\"ab12\"");
        assert!(none_match("\"ab12\"", &tag));
        assert!(none_match("\"x\", W/\"ab12\"", &tag));
        assert!(none_match("*", &tag));
        assert!(!none_match("\"ab1\"", &tag));
        assert!(if_range_holds("\"ab12\"", &tag));
        assert!(!if_range_holds("W/\"ab12\"", &tag));
        assert!(!if_range_holds("Sat, 29 Oct 1994 19:43:31 GMT", &tag));
    }

    #[test]
    fn dispositions_carry_an_ascii_name_and_the_exact_one() {
        assert_eq!(
            content_disposition("report 2026.pdf", false),
            "attachment; filename=\"report 2026.pdf\"; filename*=UTF-8''report%202026.pdf"
        );
        assert_eq!(
            content_disposition("été \"x\".png", true),
            "inline; filename=\"_t_ _x_.png\"; filename*=UTF-8''%C3%A9t%C3%A9%20%22x%22.png"
        );
    }
}
