//! JAAS login configuration, as Java's Kafka clients take it: a file of
//! named sections (`KafkaClient { Module flag key=value ...; };`), or one
//! section's body in `sasl.jaas.config`.
//!
//! Invariants: option values are bare words or double-quoted strings (a
//! backslash escapes the next character inside quotes); `//` and `/* */`
//! comments are skipped; what cannot be read is an error saying where.

use std::collections::BTreeMap;

/// One login module entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The class, e.g. `com.sun.security.auth.module.Krb5LoginModule`.
    pub class: String,
    /// `required`, `requisite`, `sufficient` or `optional`.
    pub flag: String,
    pub options: BTreeMap<String, String>,
}

impl Module {
    /// The class's last name (`Krb5LoginModule`).
    pub fn name(&self) -> &str {
        self.class.rsplit('.').next().unwrap_or(&self.class)
    }

    pub fn option(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Symbol(char),
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            if i >= chars.len() {
                return Err("a /* comment is not closed".into());
            }
            i += 2;
        } else if matches!(c, '{' | '}' | ';' | '=') {
            out.push(Token::Symbol(c));
            i += 1;
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("a quoted value is not closed".into()),
                    Some('"') => break,
                    Some('\\') => {
                        if let Some(n) = chars.get(i + 1) {
                            s.push(*n);
                        }
                        i += 2;
                        continue;
                    }
                    Some(ch) => s.push(*ch),
                }
                i += 1;
            }
            i += 1;
            out.push(Token::Quoted(s));
        } else {
            let start = i;
            while i < chars.len()
                && !chars[i].is_whitespace()
                && !matches!(chars[i], '{' | '}' | ';' | '=' | '"')
            {
                i += 1;
            }
            out.push(Token::Word(chars[start..i].iter().collect()));
        }
    }
    Ok(out)
}

/// Reads module entries up to `}` or the end.
fn modules(t: &[Token], i: &mut usize) -> Result<Vec<Module>, String> {
    let mut out = Vec::new();
    while let Some(tok) = t.get(*i) {
        let class = match tok {
            Token::Symbol('}') => break,
            Token::Word(w) => w.clone(),
            other => return Err(format!("expected a login module class, found {other:?}")),
        };
        *i += 1;
        let flag = match t.get(*i) {
            Some(Token::Word(w)) => w.clone(),
            _ => return Err(format!("`{class}` has no control flag (required, ...)")),
        };
        *i += 1;
        let mut options = BTreeMap::new();
        loop {
            match t.get(*i) {
                Some(Token::Symbol(';')) => {
                    *i += 1;
                    break;
                }
                Some(Token::Word(key)) => {
                    if t.get(*i + 1) != Some(&Token::Symbol('=')) {
                        return Err(format!("option `{key}` of `{class}` has no `=`"));
                    }
                    let value = match t.get(*i + 2) {
                        Some(Token::Word(v) | Token::Quoted(v)) => v.clone(),
                        _ => return Err(format!("option `{key}` of `{class}` has no value")),
                    };
                    options.insert(key.clone(), value);
                    *i += 3;
                }
                None => return Err(format!("the entry for `{class}` does not end with `;`")),
                Some(other) => {
                    return Err(format!("unexpected {other:?} in the entry for `{class}`"))
                }
            }
        }
        out.push(Module {
            class,
            flag,
            options,
        });
    }
    Ok(out)
}

/// The modules of a `sasl.jaas.config` value.
///
/// # Errors
/// What cannot be read.
pub fn parse_entry(text: &str) -> Result<Vec<Module>, String> {
    let t = tokens(text)?;
    let mut i = 0;
    let m = modules(&t, &mut i)?;
    if i < t.len() {
        return Err("text after the last entry".into());
    }
    if m.is_empty() {
        return Err("no login module".into());
    }
    Ok(m)
}

/// The sections of a JAAS file, by name.
///
/// # Errors
/// What cannot be read.
pub fn parse_file(text: &str) -> Result<BTreeMap<String, Vec<Module>>, String> {
    let t = tokens(text)?;
    let mut i = 0;
    let mut out = BTreeMap::new();
    while i < t.len() {
        let Token::Word(name) = &t[i] else {
            return Err(format!("expected a section name, found {:?}", t[i]));
        };
        if t.get(i + 1) != Some(&Token::Symbol('{')) {
            return Err(format!("section `{name}` has no `{{`"));
        }
        i += 2;
        let m = modules(&t, &mut i)?;
        if t.get(i) != Some(&Token::Symbol('}')) {
            return Err(format!("section `{name}` does not end with `}};`"));
        }
        i += 1;
        if t.get(i) == Some(&Token::Symbol(';')) {
            i += 1;
        }
        out.insert(name.clone(), m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kerberos_entry_gives_its_module_flag_and_options() {
        let m = parse_entry(
            "com.sun.security.auth.module.Krb5LoginModule required \
               useKeyTab=true storeKeyTab=true serviceName=\"kafka\" \
               keyTab=\"/home/z/r.keytab\" principal=\"r@KAFKA.SECURE\" useTicketCache=false;",
        )
        .unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].name(), "Krb5LoginModule");
        assert_eq!(m[0].flag, "required");
        assert_eq!(m[0].option("keyTab"), Some("/home/z/r.keytab"));
        assert_eq!(m[0].option("principal"), Some("r@KAFKA.SECURE"));
        assert_eq!(m[0].option("useKeyTab"), Some("true"));
    }

    #[test]
    fn a_file_gives_its_sections_with_comments_skipped() {
        let f = parse_file(
            "// the client\nKafkaClient {\n  org.apache.kafka.common.security.scram.ScramLoginModule required\n  username=\"u\" /* inline */ password=\"p\\\"q\";\n};\nOther { a.B optional; };\n",
        )
        .unwrap();
        let m = &f["KafkaClient"][0];
        assert_eq!(m.name(), "ScramLoginModule");
        assert_eq!(m.option("password"), Some("p\"q"));
        assert_eq!(f["Other"][0].flag, "optional");
    }

    #[test]
    fn what_cannot_be_read_says_why() {
        assert!(parse_entry("a.B required x=1").unwrap_err().contains("`;`"));
        assert!(parse_entry("a.B required x;")
            .unwrap_err()
            .contains("no `=`"));
        assert!(parse_file("K { a.B required x=\"1; };")
            .unwrap_err()
            .contains("not closed"));
        assert!(parse_entry("").unwrap_err().contains("no login module"));
    }
}
