//! The `java.util.Properties` text format, in full, as Kafka's tools and
//! Kafka Connect read their `.properties` files.
//!
//! Invariants (those of `Properties.load`): a natural line ends at `\n`,
//! `\r` or `\r\n`; a line whose first non-blank character is `#` or `!` is a
//! comment, and so is never continued; a line ending in an odd number of
//! backslashes continues on the next, whose leading blanks are dropped; the
//! key ends at the first unescaped `=`, `:` or blank, and one `=` or `:`
//! (with blanks around it) separates it from the value; `\t`, `\n`, `\r`,
//! `\f` and `\uXXXX` are escapes, and a backslash before any other
//! character stands for that character. A later key replaces an earlier one.
//! Where Java would throw (a malformed `\u`), this is an error naming the
//! file and line.

use std::path::{Path, PathBuf};

/// One key and value, with the line its logical line starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// A properties file, in the order its keys first appear.
#[derive(Debug, Clone, Default)]
pub struct Properties {
    pub path: PathBuf,
    entries: Vec<Entry>,
}

/// A properties file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PropertiesError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl Properties {
    /// Reads and parses a file.
    ///
    /// # Errors
    /// [`PropertiesError`] naming the file (and line).
    pub fn load(path: &Path) -> Result<Properties, PropertiesError> {
        let bytes = std::fs::read(path).map_err(|source| PropertiesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // Properties.load(InputStream) reads ISO 8859-1; files written for
        // Kafka are UTF-8 in practice, so UTF-8 is tried first.
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => e.into_bytes().iter().map(|b| char::from(*b)).collect(),
        };
        Properties::parse(path, &text)
    }

    /// Parses text; `path` names it in errors.
    ///
    /// # Errors
    /// [`PropertiesError::Syntax`] for a malformed `\uXXXX` escape.
    pub fn parse(path: &Path, text: &str) -> Result<Properties, PropertiesError> {
        let mut props = Properties {
            path: path.to_path_buf(),
            entries: Vec::new(),
        };
        let lines = natural_lines(text);
        let mut i = 0;
        while i < lines.len() {
            let start = i;
            let first = lines[i].trim_start_matches([' ', '\t', '\x0c']);
            i += 1;
            if first.is_empty() || first.starts_with('#') || first.starts_with('!') {
                continue;
            }
            // Join continued lines.
            let mut logical = String::from(first);
            while ends_in_odd_backslashes(&logical) && i < lines.len() {
                logical.pop();
                logical.push_str(lines[i].trim_start_matches([' ', '\t', '\x0c']));
                i += 1;
            }
            if ends_in_odd_backslashes(&logical) {
                // A continuation at the end of the file: Java drops it.
                logical.pop();
            }
            let (key, value) = split(&logical).map_err(|message| PropertiesError::Syntax {
                path: path.to_path_buf(),
                line: start + 1,
                message,
            })?;
            props.set(key, value, start + 1);
        }
        Ok(props)
    }

    fn set(&mut self, key: String, value: String, line: usize) {
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) => {
                e.value = value;
                e.line = line;
            }
            None => self.entries.push(Entry { key, value, line }),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entry(key).map(|e| e.value.as_str())
    }

    /// The entry of `key`.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Every entry, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// `file:line` of `key`, for messages.
    pub fn at(&self, key: &str) -> String {
        match self.entry(key) {
            Some(e) => self.line_of(e),
            None => self.path.display().to_string(),
        }
    }

    /// `file:line` of one of this file's entries.
    pub fn line_of(&self, entry: &Entry) -> String {
        format!("{}:{}", self.path.display(), entry.line)
    }
}

fn natural_lines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match rest.find(['\n', '\r']) {
            Some(i) => {
                out.push(&rest[..i]);
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.push(rest);
                rest = "";
            }
        }
    }
    out
}

fn ends_in_odd_backslashes(s: &str) -> bool {
    s.bytes().rev().take_while(|b| *b == b'\\').count() % 2 == 1
}

/// Key and value of a logical line (leading blanks already removed).
fn split(line: &str) -> Result<(String, String), String> {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    let mut key_end = chars.len();
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '=' | ':' | ' ' | '\t' | '\x0c' => {
                key_end = i;
                break;
            }
            _ => i += 1,
        }
    }
    let key_end = key_end.min(chars.len());
    let mut j = key_end;
    while j < chars.len() && matches!(chars[j], ' ' | '\t' | '\x0c') {
        j += 1;
    }
    if j < chars.len() && matches!(chars[j], '=' | ':') {
        j += 1;
        while j < chars.len() && matches!(chars[j], ' ' | '\t' | '\x0c') {
            j += 1;
        }
    }
    let key: String = chars[..key_end].iter().collect();
    let value: String = chars[j.min(chars.len())..].iter().collect();
    Ok((unescape(&key)?, unescape(&value)?))
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            None => {}
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = (hex.len() == 4)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .ok_or_else(|| format!("malformed \\uxxxx escape `\\u{hex}`"))?;
                out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
            }
            Some(other) => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Properties {
        Properties::parse(Path::new("t.properties"), text).unwrap()
    }

    #[test]
    fn separators_comments_and_blank_lines_are_read_as_java_reads_them() {
        let p =
            parse("# a comment\n! another\n\na=1\nb : 2\nc 3\n  d\t=\t4 \ne:\nf\ng==5\nh=a=b\n");
        let got: Vec<(&str, &str)> = p
            .entries()
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a", "1"),
                ("b", "2"),
                ("c", "3"),
                ("d", "4 "),
                ("e", ""),
                ("f", ""),
                ("g", "=5"),
                ("h", "a=b")
            ]
        );
        assert_eq!(p.entry("c").unwrap().line, 6);
    }

    #[test]
    fn continuations_join_lines_and_drop_the_next_lines_leading_blanks() {
        let p = parse("k = one \\\n    two \\\n\tthree\nnext=1\r\nlast=2\rend=3");
        assert_eq!(p.get("k"), Some("one two three"));
        assert_eq!(p.entry("next").unwrap().line, 4);
        assert_eq!(p.get("last"), Some("2"));
        assert_eq!(p.get("end"), Some("3"));
        // An even number of backslashes is an escaped backslash, not a continuation.
        let p = parse("k=a\\\\\nj=b");
        assert_eq!(p.get("k"), Some("a\\"));
        assert_eq!(p.get("j"), Some("b"));
        // A comment line is never continued.
        let p = parse("# c \\\nk=v");
        assert_eq!(p.get("k"), Some("v"));
    }

    #[test]
    fn escapes_in_keys_and_values_are_decoded() {
        let p = parse("a\\=b\\:c\\ d=x\\ty\\u00e9\\z\\\\\n");
        assert_eq!(p.get("a=b:c d"), Some("x\ty\u{e9}z\\"));
    }

    #[test]
    fn a_malformed_unicode_escape_names_the_file_and_line() {
        let e = Properties::parse(Path::new("w.properties"), "a=1\nb=\\u12g4\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("w.properties:2: malformed"), "{e}");
    }

    #[test]
    fn a_later_key_replaces_an_earlier_one() {
        let p = parse("a=1\na=2\n");
        assert_eq!(p.get("a"), Some("2"));
        assert_eq!(p.entries().len(), 1);
    }
}
