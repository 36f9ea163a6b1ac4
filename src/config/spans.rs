//! Byte spans of the file's text as `file:line:column`, for messages, and
//! the one way validation reports an invalid value.

use std::path::Path;

use super::ConfigError;

/// Knows the file's text, to turn byte offsets into `file:line:column`.
pub(super) struct Locator<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

impl Locator<'_> {
    pub(super) fn at(&self, span: std::ops::Range<usize>) -> String {
        if span.start == 0 && span.end == 0 {
            return self.path.display().to_string();
        }
        self.at_offset(span.start)
    }

    /// Where a line starts, past its indentation: where a dotted key begins.
    pub(super) fn line_start(&self, offset: usize) -> usize {
        let start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let indent =
            self.text[start..].len() - self.text[start..].trim_start_matches([' ', '\t']).len();
        start + indent
    }

    pub(super) fn at_offset(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{}:{line}:{column}", self.path.display())
    }

    pub(super) fn invalid<T>(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            location: self.at(span),
            key: key.to_string(),
            message: message.into(),
        })
    }

    /// Finds where a dotted key under `[kafka]` was written, whether as
    /// `a.b = ..`, `"a.b" = ..` or in a `[kafka.a]` table.
    pub(super) fn kafka_key_span(&self, key: &str) -> std::ops::Range<usize> {
        fn find(table: &toml::de::DeTable<'_>, rest: &str) -> Option<std::ops::Range<usize>> {
            for (k, v) in table.iter() {
                let name: &str = k.get_ref();
                if name == rest {
                    return Some(k.span());
                }
                if let Some(tail) = rest.strip_prefix(name).and_then(|t| t.strip_prefix('.')) {
                    if let toml::de::DeValue::Table(inner) = v.get_ref() {
                        if let Some(span) = find(inner, tail) {
                            return Some(span);
                        }
                    }
                }
            }
            None
        }
        let Ok(doc) = toml::de::DeTable::parse(self.text) else {
            return 0..0;
        };
        let kafka = doc.get_ref().iter().find(|(k, _)| k.get_ref() == "kafka");
        match kafka {
            Some((_, v)) => match v.get_ref() {
                toml::de::DeValue::Table(t) => find(t, key).map_or(0..0, |s| {
                    let start = self.line_start(s.start);
                    start..s.end
                }),
                _ => 0..0,
            },
            None => 0..0,
        }
    }
}
