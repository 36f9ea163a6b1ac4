//! Secrets never shown: which settings hold one (by the words in their
//! names, not a list of known keys), URLs printed without their user info,
//! and the text of errors scrubbed before it is logged or published.
//!
//! Invariants: a setting whose name holds a secret word is never printed
//! (`Debug`, `check-config`, errors quoting it); a URL with a user or
//! password is printed without them; an error published in a message's
//! `ztfhook.error` attribute carries neither credentials nor local paths.

/// The words that mark a setting as secret, wherever they are in its name
/// (`sasl.password`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`,
/// `sasl.oauthbearer.assertion.private.key.passphrase`, `sasl.jaas.config`,
/// a `token`, a `credentials` file's content).
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "passphrase",
    "pem",
    "jaas",
    "token",
    "credential",
    "private",
    "assertion",
    "apikey",
    "api.key",
    "api_key",
];

/// What a secret is printed as.
pub const REDACTED: &str = "<redacted>";

/// Whether a setting of this name holds a secret that must never be printed.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| key.contains(w))
        // librdkafka's in-memory key and its OAUTHBEARER settings string.
        || key == "ssl_key"
        || (key.contains("oauthbearer") && key.ends_with("config"))
}

/// `text` with the user info of every URL in it removed
/// (`https://u:p@host/x` -> `https://host/x`); other text unchanged.
pub fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at `/`, `?` or `#` (RFC 3986); user info may
        // hold `;`, `,`, `(`, `)`, `'` and the like unencoded, so besides
        // those only what cannot be in a URL ends it.
        let end = tail
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || "\"<>`".contains(c)
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `text` with every value in `secrets` replaced by [`REDACTED`] and URLs
/// without user info.
pub fn scrub<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = scrub_urls(text);
    for secret in secrets {
        if !secret.is_empty() {
            out = out.replace(secret, REDACTED);
        }
    }
    out
}

/// A TOML parser's message with the value on any quoted line of a secret
/// setting (`5 | sasl.password = "..."`) replaced by [`REDACTED`].
pub fn scrub_toml_excerpt(message: &str) -> String {
    message
        .lines()
        .map(|line| {
            let Some((gutter, text)) = line.split_once('|') else {
                return line.to_string();
            };
            let Some((key, _)) = text.split_once('=') else {
                return line.to_string();
            };
            let name = key.trim().trim_matches('"');
            if is_secret_key(name) {
                format!("{gutter}|{key}= {REDACTED}")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An error as a published attribute may carry it: URLs without user info,
/// and each absolute local path cut to its file name (`hook
/// /home/me/rules/r.rhai:3:4: ...` -> `hook r.rhai:3:4: ...`).
pub fn public_error(text: &str) -> String {
    let text = scrub_urls(text);
    let mut out = String::with_capacity(text.len());
    let mut word_start = true;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if word_start && c == '/' {
            // A path: up to the next whitespace or quote; keep what follows
            // its last slash.
            let end = text[i..]
                .find(|c: char| c.is_whitespace() || "\"'`()".contains(c))
                .map_or(text.len(), |n| i + n);
            let path = &text[i..end];
            out.push_str(&path[path.rfind('/').map_or(0, |s| s + 1)..]);
            while chars.peek().is_some_and(|(j, _)| *j < end) {
                chars.next();
            }
            word_start = false;
            continue;
        }
        word_start = c.is_whitespace() || "\"'`(".contains(c);
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_settings_are_found_by_the_words_in_their_names() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.key.pem",
            "ssl_key",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.pem",
            "sasl.oauthbearer.assertion.private.key.file",
            "sasl.jaas.config",
            "SASL.PASSWORD",
            "registry.token",
            "google.credentials.json",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "bootstrap.servers",
            "group.id",
            "sasl.username",
            "sasl.kerberos.keytab",
            "sasl.kerberos.principal",
            "ssl.ca.location",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn urls_lose_their_user_info_and_nothing_else() {
        assert_eq!(
            scrub_urls("https://alice:s3cret@registry.example:8081/schema-registry"),
            "https://registry.example:8081/schema-registry"
        );
        assert_eq!(scrub_urls("http://127.0.0.1:1/x"), "http://127.0.0.1:1/x");
        assert_eq!(
            scrub_urls("registry http://u:p@h/schemas/ids/1: refused (see http://h2/a@b)"),
            "registry http://h/schemas/ids/1: refused (see http://h2/a@b)"
        );
        // Characters legal in user info, unencoded, do not end it.
        for url in [
            "https://alice:Hunter2;SECRET@reg.example/x",
            "https://alice:Hun(ter2)SECRET@reg.example/x",
            "https://alice:p,w'x@reg.example/x",
        ] {
            assert_eq!(scrub_urls(url), "https://reg.example/x", "{url}");
            assert_eq!(
                scrub_urls(&format!("registry {url}: refused")),
                "registry https://reg.example/x: refused"
            );
        }
        assert_eq!(
            scrub("a pw=hunter2 at https://bob@h", ["hunter2"]),
            "a pw=<redacted> at https://h"
        );
    }

    #[test]
    fn a_published_error_keeps_file_names_and_drops_directories() {
        assert_eq!(
            public_error("hook /tmp/x/rules/r.rhai:3:4: bad (at /srv/schemas/lsst.v9_0.avsc)"),
            "hook r.rhai:3:4: bad (at lsst.v9_0.avsc)"
        );
        assert_eq!(
            public_error("topic projects/p/topics/t: refused; https://u:p@h/v1 said no"),
            "topic projects/p/topics/t: refused; https://h/v1 said no"
        );
    }
}
