//! A small Blueprint (Android.bp) reader: enough of the language to extract module properties.
//!
//! `bpfmt` (Soong's own parser, run by `tests/android_bp.rs`) decides whether a file is valid
//! Blueprint; it cannot tell us what a module says. This reader evaluates the subset Soong files
//! use outside `select`: modules (`type { name: value, ... }`), maps, lists, strings (quoted and
//! raw), bools, integers, `+` (strings, lists, integers, maps) and file-level variables
//! (`x = ...`, `x += ...`). Anything else is an error with its line and column, never a guess.

use std::collections::BTreeMap;
use std::fmt;

/// A Blueprint value after variables and `+` are evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `"text"` or `` `raw text` ``.
    String(String),
    /// `true` / `false`.
    Bool(bool),
    /// `42`, `-1`.
    Int(i64),
    /// `[a, b]`.
    List(Vec<Value>),
    /// `{ key: value }`, in source order.
    Map(Vec<(String, Value)>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Bool(_) => "bool",
            Value::Int(_) => "integer",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The property `key` of a map value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The strings of a list value (`None` if this is not a list of strings).
    pub fn as_strings(&self) -> Option<Vec<&str>> {
        match self {
            Value::List(items) => items.iter().map(Value::as_str).collect(),
            _ => None,
        }
    }
}

/// One module: `kind { properties }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The module type, e.g. `rust_library`.
    pub kind: String,
    /// Its properties, in source order.
    pub properties: Vec<(String, Value)>,
    /// The 1-based line of the module type.
    pub line: usize,
}

impl Module {
    /// The top-level property `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.properties.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The `name` property (every Soong module but `package` has one).
    pub fn name(&self) -> Option<&str> {
        self.get("name").and_then(Value::as_str)
    }

    /// The properties as one map value (for walking nested maps such as `target: {...}`).
    pub fn as_map(&self) -> Value {
        Value::Map(self.properties.clone())
    }
}

/// A parsed Android.bp file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct File {
    /// The modules, in source order.
    pub modules: Vec<Module>,
    /// The file-level variables with their final values.
    pub variables: BTreeMap<String, Value>,
}

/// Why a file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses the text of one Android.bp file.
pub fn parse(text: &str) -> Result<File, ParseError> {
    Parser { chars: text.chars().collect(), pos: 0, file: File::default() }.file()
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    file: File,
}

impl Parser {
    fn error<T>(&self, at: usize, message: impl Into<String>) -> Result<T, ParseError> {
        let before = &self.chars[..at.min(self.chars.len())];
        let line = before.iter().filter(|&&c| c == '\n').count() + 1;
        let column = before.iter().rev().take_while(|&&c| c != '\n').count() + 1;
        Err(ParseError { line, column, message: message.into() })
    }

    fn line_at(&self, at: usize) -> usize {
        self.chars[..at].iter().filter(|&&c| c == '\n').count() + 1
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// Skips white space and `//` / `/* */` comments.
    fn skip_blank(&mut self) -> Result<(), ParseError> {
        loop {
            match (self.peek(), self.chars.get(self.pos + 1)) {
                (Some(c), _) if c.is_whitespace() => self.pos += 1,
                (Some('/'), Some('/')) => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                (Some('/'), Some('*')) => {
                    let start = self.pos;
                    self.pos += 2;
                    loop {
                        match (self.peek(), self.chars.get(self.pos + 1)) {
                            (Some('*'), Some('/')) => {
                                self.pos += 2;
                                break;
                            }
                            (Some(_), _) => self.pos += 1,
                            (None, _) => return self.error(start, "unterminated /* comment"),
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn expect(&mut self, wanted: char) -> Result<(), ParseError> {
        self.skip_blank()?;
        match self.peek() {
            Some(c) if c == wanted => {
                self.pos += 1;
                Ok(())
            }
            Some(c) => self.error(self.pos, format!("expected `{wanted}`, found `{c}`")),
            None => self.error(self.pos, format!("expected `{wanted}`, found the end of the file")),
        }
    }

    fn identifier(&mut self) -> Result<String, ParseError> {
        self.skip_blank()?;
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        let ident: String = self.chars[start..self.pos].iter().collect();
        if ident.is_empty() || ident.starts_with(|c: char| c.is_ascii_digit()) {
            return match self.peek() {
                Some(c) => self.error(start, format!("expected a name, found `{c}`")),
                None => self.error(start, "expected a name, found the end of the file"),
            };
        }
        Ok(ident)
    }

    fn file(mut self) -> Result<File, ParseError> {
        loop {
            self.skip_blank()?;
            if self.peek().is_none() {
                return Ok(self.file);
            }
            let start = self.pos;
            let name = self.identifier()?;
            self.skip_blank()?;
            match (self.peek(), self.chars.get(self.pos + 1)) {
                (Some('{'), _) => {
                    self.pos += 1;
                    let properties = self.properties('}')?;
                    self.file.modules.push(Module {
                        kind: name,
                        properties,
                        line: self.line_at(start),
                    });
                }
                (Some('='), _) => {
                    self.pos += 1;
                    if self.file.variables.contains_key(&name) {
                        return self.error(start, format!("variable `{name}` is already defined"));
                    }
                    let value = self.expression()?;
                    self.file.variables.insert(name, value);
                }
                (Some('+'), Some('=')) => {
                    self.pos += 2;
                    let Some(old) = self.file.variables.get(&name).cloned() else {
                        return self.error(start, format!("`{name} +=` before `{name} =`"));
                    };
                    let value = self.expression()?;
                    let sum = self.add(old, value, start)?;
                    self.file.variables.insert(name, sum);
                }
                (Some('('), _) => {
                    return self
                        .error(self.pos, format!("`{name}(...)` is not Blueprint syntax we read"))
                }
                (Some(c), _) => {
                    return self.error(self.pos, format!("expected `{{`, `=` or `+=`, found `{c}`"))
                }
                (None, _) => return self.error(self.pos, "unexpected end of the file"),
            }
        }
    }

    /// `key: value, ...` up to `close`; duplicate keys are an error, as in Soong.
    fn properties(&mut self, close: char) -> Result<Vec<(String, Value)>, ParseError> {
        let mut properties: Vec<(String, Value)> = Vec::new();
        loop {
            self.skip_blank()?;
            if self.peek() == Some(close) {
                self.pos += 1;
                return Ok(properties);
            }
            let start = self.pos;
            let key = self.identifier()?;
            self.skip_blank()?;
            match self.peek() {
                Some(':') => self.pos += 1,
                Some('=') => {
                    return self.error(self.pos, "`=` in a module: properties are `name: value`")
                }
                _ => self.expect(':')?,
            }
            let value = self.expression()?;
            if properties.iter().any(|(k, _)| *k == key) {
                return self.error(start, format!("property `{key}` is set twice"));
            }
            properties.push((key, value));
            self.skip_blank()?;
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(c) if c == close => {}
                Some(c) => {
                    return self.error(self.pos, format!("expected `,` or `{close}`, found `{c}`"))
                }
                None => return self.error(self.pos, format!("missing `{close}`")),
            }
        }
    }

    fn expression(&mut self) -> Result<Value, ParseError> {
        let mut value = self.operand()?;
        loop {
            self.skip_blank()?;
            if self.peek() != Some('+') {
                return Ok(value);
            }
            let at = self.pos;
            self.pos += 1;
            let right = self.operand()?;
            value = self.add(value, right, at)?;
        }
    }

    fn add(&self, left: Value, right: Value, at: usize) -> Result<Value, ParseError> {
        match (left, right) {
            (Value::String(a), Value::String(b)) => Ok(Value::String(a + &b)),
            (Value::Int(a), Value::Int(b)) => match a.checked_add(b) {
                Some(sum) => Ok(Value::Int(sum)),
                None => self.error(at, "integer overflow"),
            },
            (Value::List(mut a), Value::List(b)) => {
                a.extend(b);
                Ok(Value::List(a))
            }
            // Soong merges maps: keys on one side are kept, keys on both sides are added.
            (Value::Map(mut a), Value::Map(b)) => {
                for (key, value) in b {
                    match a.iter().position(|(k, _)| *k == key) {
                        Some(i) => {
                            let old = a[i].1.clone();
                            a[i].1 = self.add(old, value, at)?;
                        }
                        None => a.push((key, value)),
                    }
                }
                Ok(Value::Map(a))
            }
            (a, b) => self.error(at, format!("cannot add {} to {}", b.kind(), a.kind())),
        }
    }

    fn operand(&mut self) -> Result<Value, ParseError> {
        self.skip_blank()?;
        let start = self.pos;
        match self.peek() {
            Some('"') => self.quoted_string(),
            Some('`') => {
                self.pos += 1;
                let begin = self.pos;
                while self.peek().is_some_and(|c| c != '`') {
                    self.pos += 1;
                }
                if self.peek().is_none() {
                    return self.error(start, "unterminated raw string");
                }
                let text = self.chars[begin..self.pos].iter().collect();
                self.pos += 1;
                Ok(Value::String(text))
            }
            Some('[') => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_blank()?;
                    if self.peek() == Some(']') {
                        self.pos += 1;
                        return Ok(Value::List(items));
                    }
                    items.push(self.expression()?);
                    self.skip_blank()?;
                    match self.peek() {
                        Some(',') => self.pos += 1,
                        Some(']') => {}
                        Some(c) => {
                            return self
                                .error(self.pos, format!("expected `,` or `]`, found `{c}`"))
                        }
                        None => return self.error(start, "missing `]`"),
                    }
                }
            }
            Some('{') => {
                self.pos += 1;
                Ok(Value::Map(self.properties('}')?))
            }
            Some(c) if c == '-' || c.is_ascii_digit() => {
                self.pos += 1;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                let text: String = self.chars[start..self.pos].iter().collect();
                match text.parse() {
                    Ok(n) => Ok(Value::Int(n)),
                    Err(_) => self.error(start, format!("bad integer `{text}`")),
                }
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let name = self.identifier()?;
                match name.as_str() {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    _ => {
                        self.skip_blank()?;
                        if self.peek() == Some('(') {
                            return self.error(
                                start,
                                format!("`{name}(...)` is not supported (the bpfmt snapshot CI uses predates `select`)"),
                            );
                        }
                        match self.file.variables.get(&name) {
                            Some(value) => Ok(value.clone()),
                            None => self.error(start, format!("undefined variable `{name}`")),
                        }
                    }
                }
            }
            Some(c) => self.error(start, format!("expected a value, found `{c}`")),
            None => self.error(start, "expected a value, found the end of the file"),
        }
    }

    /// A Go-style double-quoted string (the escapes Blueprint's scanner accepts).
    fn quoted_string(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        self.pos += 1;
        let mut text = String::new();
        loop {
            let Some(c) = self.peek() else { return self.error(start, "unterminated string") };
            self.pos += 1;
            match c {
                '"' => return Ok(Value::String(text)),
                '\n' => return self.error(start, "newline in string"),
                '\\' => {
                    let Some(e) = self.peek() else {
                        return self.error(start, "unterminated string");
                    };
                    self.pos += 1;
                    text.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '\\' => '\\',
                        '"' => '"',
                        '\'' => '\'',
                        'a' => '\u{7}',
                        'b' => '\u{8}',
                        'f' => '\u{c}',
                        'v' => '\u{b}',
                        _ => return self.error(self.pos - 2, format!("unknown escape `\\{e}`")),
                    });
                }
                _ => text.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    #[test]
    fn reads_a_module_with_every_value_kind() {
        let file = parse(
            r#"
            // A comment.
            rust_library {
                name: "libfoo", /* inline */
                srcs: ["src/lib.rs"],
                host_supported: true,
                min_sdk: 29,
                offset: -3,
                raw: `a\nb`,
                target: {
                    android: { rustlibs: ["liblog_rust"] },
                },
            }
            "#,
        )
        .unwrap();
        assert_eq!(file.modules.len(), 1);
        let module = &file.modules[0];
        assert_eq!(module.kind, "rust_library");
        assert_eq!(module.line, 3);
        assert_eq!(module.name(), Some("libfoo"));
        assert_eq!(module.get("srcs").unwrap().as_strings(), Some(vec!["src/lib.rs"]));
        assert_eq!(module.get("host_supported"), Some(&Value::Bool(true)));
        assert_eq!(module.get("min_sdk"), Some(&Value::Int(29)));
        assert_eq!(module.get("offset"), Some(&Value::Int(-3)));
        assert_eq!(module.get("raw"), Some(&s("a\\nb")));
        let rustlibs = module.get("target").and_then(|t| t.get("android")?.get("rustlibs"));
        assert_eq!(rustlibs.and_then(Value::as_strings), Some(vec!["liblog_rust"]));
    }

    #[test]
    fn evaluates_variables_and_concatenation() {
        let file = parse(
            r#"
            common = ["a"]
            common += ["b"]
            prefix = "lib" + "foo"
            n = 1 + 2
            m = { x: ["1"], y: "p" } + { x: ["2"], z: true }
            cc_binary {
                name: prefix + "_bin",
                srcs: common + ["c"],
                n: n,
                m: m,
            }
            "#,
        )
        .unwrap();
        let module = &file.modules[0];
        assert_eq!(module.name(), Some("libfoo_bin"));
        assert_eq!(module.get("srcs").unwrap().as_strings(), Some(vec!["a", "b", "c"]));
        assert_eq!(module.get("n"), Some(&Value::Int(3)));
        assert_eq!(
            module.get("m"),
            Some(&Value::Map(vec![
                ("x".into(), Value::List(vec![s("1"), s("2")])),
                ("y".into(), s("p")),
                ("z".into(), Value::Bool(true)),
            ]))
        );
        assert_eq!(file.variables["common"], Value::List(vec![s("a"), s("b")]));
    }

    #[test]
    fn unescapes_quoted_strings() {
        let file = parse(r#"m { cmd: "a \"b\" \\ c\td" }"#).unwrap();
        assert_eq!(file.modules[0].get("cmd"), Some(&s("a \"b\" \\ c\td")));
    }

    #[test]
    fn accepts_empty_lists_maps_and_trailing_commas() {
        let file = parse("a { l: [], m: {}, x: [\"1\",], }\nb {}").unwrap();
        assert_eq!(file.modules.len(), 2);
        assert_eq!(file.modules[0].get("l"), Some(&Value::List(vec![])));
        assert_eq!(file.modules[0].get("m"), Some(&Value::Map(vec![])));
        assert_eq!(file.modules[1].line, 2);
    }

    fn error_of(text: &str) -> ParseError {
        parse(text).expect_err("should not parse")
    }

    #[test]
    fn rejects_malformed_files_with_their_position() {
        let e = error_of("m {\n  name: \"x\"\n  srcs: [],\n}");
        assert_eq!((e.line, e.column), (3, 3), "{e}");
        assert!(e.message.contains("expected `,` or `}`"), "{e}");

        assert!(error_of("m { name: \"x }").message.contains("unterminated string"));
        assert!(error_of("m { a: 1, a: 2 }").message.contains("set twice"));
        assert!(error_of("m { a: b }").message.contains("undefined variable `b`"));
        assert!(error_of("m { a: \"x\" + 1 }").message.contains("cannot add integer to string"));
        assert!(error_of("m { a = 1 }").message.contains("properties are `name: value`"));
        assert!(error_of("x += [1]").message.contains("before"));
        assert!(error_of("x = 1\nx = 2").message.contains("already defined"));
        assert!(error_of("m { a: [1 }").message.contains("expected `,` or `]`"));
        assert!(error_of("m { a: 1 ").message.contains("missing `}`"));
        assert!(error_of("/* open").message.contains("unterminated /*"));
        assert!(error_of("m { a: \"\\q\" }").message.contains("unknown escape"));
        assert!(error_of("m { a: 99999999999999999999 }").message.contains("bad integer"));
    }

    #[test]
    fn rejects_select_which_the_ci_bpfmt_cannot_read() {
        let e = error_of("m { srcs: select(soong_config_variable(\"a\", \"b\"), {}) }");
        assert!(e.message.contains("select"), "{e}");
    }
}
