//! Minimal JSON output: one object per line, fields in the order given.

use std::fmt::Write;

/// A JSON value of the few kinds the reports use.
pub enum Value {
    Str(String),
    Num(f64),
    Int(u64),
    Null,
}

/// Quotes a string for JSON.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One JSON object on one line.
pub fn object(fields: &[(&str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Str(s) => quote(s),
                Value::Num(n) if n.is_finite() => format!("{n}"),
                Value::Num(_) => "null".into(),
                Value::Int(i) => i.to_string(),
                Value::Null => "null".into(),
            };
            format!("{}: {v}", quote(k))
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}
