//! Recognising an HTML page where a product should be: the error page of a server or a proxy, or a login
//! page after a redirect, sent with `200 OK`.

/// An HTML page, as far as its first bytes tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Its `<title>`, if the first bytes hold one.
    pub title: Option<String>,
}

impl Page {
    /// "the server sent an HTML page (text/html, 312 bytes, title 'MAST: Service Unavailable') instead of
    /// jw…_asn.json".
    pub fn instead_of(
        &self,
        filename: &str,
        content_type: Option<&str>,
        size: Option<u64>,
    ) -> String {
        let mut facts = Vec::new();
        if let Some(t) = content_type {
            facts.push(t.to_string());
        }
        if let Some(n) = size {
            facts.push(format!("{n} bytes"));
        }
        if let Some(t) = &self.title {
            facts.push(format!("title '{t}'"));
        }
        let facts = if facts.is_empty() {
            String::new()
        } else {
            format!(" ({})", facts.join(", "))
        };
        format!(
            "the server sent an HTML page{facts} instead of {filename}: an error or login page, not the \
             product"
        )
    }
}

/// True for a `Content-Type` of HTML.
pub fn is_html_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "text/html" || essence == "application/xhtml+xml"
}

/// The page, if `head` (a body's first bytes) begins like an HTML document.
pub fn sniff(head: &[u8]) -> Option<Page> {
    let text = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let start = text.iter().position(|b| !b.is_ascii_whitespace())?;
    let lower: Vec<u8> = text[start..]
        .iter()
        .take(512)
        .map(u8::to_ascii_lowercase)
        .collect();
    let begins = |p: &[u8]| lower.starts_with(p);
    let html = begins(b"<!doctype html")
        || begins(b"<html")
        || begins(b"<head")
        || begins(b"<body")
        || ((begins(b"<?xml") || begins(b"<!--")) && contains(&lower, b"<html"));
    html.then(|| Page {
        title: title(&text[start..]),
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn title(text: &[u8]) -> Option<String> {
    let lower: Vec<u8> = text.iter().map(u8::to_ascii_lowercase).collect();
    let open = lower.windows(7).position(|w| w == b"<title>")? + 7;
    let close = open + lower[open..].windows(8).position(|w| w == b"</title>")?;
    let t = String::from_utf8_lossy(&text[open..close]);
    let t: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(t.chars().take(100).collect()).filter(|t: &String| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_recognised_with_their_titles() {
        let p =
            sniff(b"\xef\xbb\xbf \n<!DOCTYPE HTML><html><head><TITLE> 403\n Forbidden </title>")
                .unwrap();
        assert_eq!(p.title.as_deref(), Some("403 Forbidden"));
        assert!(sniff(b"<html><body>x</body></html>").is_some());
        assert!(sniff(b"<?xml version=\"1.0\"?>\n<html xmlns=\"x\">").is_some());
        assert!(sniff(b"SIMPLE  =                    T").is_none());
        assert!(sniff(b"[{\"a\": \"<html>\"}]").is_none());
        assert!(sniff(b"").is_none());
        let m = p.instead_of("jw01_asn.json", Some("text/html"), Some(312));
        assert_eq!(
            m,
            "the server sent an HTML page (text/html, 312 bytes, title '403 Forbidden') instead of \
             jw01_asn.json: an error or login page, not the product"
        );
    }

    #[test]
    fn html_content_types() {
        assert!(is_html_type("text/html; charset=utf-8"));
        assert!(is_html_type("TEXT/HTML"));
        assert!(!is_html_type("application/octet-stream"));
        assert!(!is_html_type("text/plain"));
    }
}
