//! Chat templates: renders a model's Jinja chat template, in the dialect Hugging Face
//! transformers runs, into the prompt text for a conversation.
//!
//! transformers renders with Jinja2 set to `trim_blocks` and `lstrip_blocks`, loop controls,
//! Python string methods, a `tojson` that neither escapes HTML nor non-ASCII text, and the
//! globals `raise_exception` and `strftime_now`; this module gives minijinja the same.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant", "tool", ...
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The message of a template's `raise_exception(...)`, carried as the source of the render error.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Compiles a template; `bos_token` / `eos_token` become the template's variables of those names.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, neutralize_generation_tags(source))
            .map_err(|e| {
                ModelError::ChatTemplate(format!("the template does not compile: {}", describe(&e)))
            })?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders a conversation; `add_generation_prompt` appends the opening of the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Renders with extra template variables, such as Qwen3's `enable_thinking`. The variables
    /// transformers always passes (`messages`, `add_generation_prompt`, `tools`, `documents` and
    /// the special tokens) take precedence over `extra`.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| {
            ModelError::ChatTemplate(format!("the template is missing: {}", describe(&e)))
        })?;
        let mut context: Vec<(String, Value)> = extra
            .iter()
            .map(|(k, v)| (k.clone(), Value::from_serialize(v)))
            .collect();
        context.push(("messages".to_string(), Value::from_serialize(messages)));
        context.push((
            "add_generation_prompt".to_string(),
            Value::from(add_generation_prompt),
        ));
        // transformers always passes these, as None when absent, so `tools is defined` holds.
        context.push(("tools".to_string(), Value::from(())));
        context.push(("documents".to_string(), Value::from(())));
        if let Some(bos) = &self.bos_token {
            context.push(("bos_token".to_string(), Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            context.push(("eos_token".to_string(), Value::from(eos.as_str())));
        }
        let context: Value = context.into_iter().collect();
        template
            .render(context)
            .map_err(|e| match raised_message(&e) {
                Some(message) => ModelError::ChatTemplate(format!(
                    "the template rejected the conversation: {message}"
                )),
                None => ModelError::ChatTemplate(format!("rendering failed: {}", describe(&e))),
            })
    }
}

/// A minijinja error with its chain of causes, on one line.
fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(raised) = cause.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        source = cause.source();
    }
    None
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        "the template raised an exception",
    )
    .with_source(RaisedException(message)))
}

/// transformers' `strftime_now`: the current time, formatted like Python's `strftime`. The time is
/// UTC, since the server's time zone is not something a prompt should depend on.
fn strftime_now(format: String) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    strftime(&format, now)
}

/// Formats seconds since the Unix epoch (UTC) with C/Python `strftime` directives.
fn strftime(format: &str, unix_seconds: i64) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match directive {
            'a' => write!(out, "{}", &day_name[..3]),
            'A' => write!(out, "{day_name}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'm' => write!(out, "{month:02}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'Y' => write!(out, "{year}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'j' => write!(out, "{day_of_year:03}"),
            'u' => write!(out, "{}", weekday + 1),
            'w' => write!(out, "{}", (weekday + 1) % 7),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'D' => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'R' => write!(out, "{hour:02}:{minute:02}"),
            'c' => write!(
                out,
                "{} {} {day:>2} {hour:02}:{minute:02}:{second:02} {year}",
                &day_name[..3],
                &month_name[..3]
            ),
            'x' => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'X' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'Z' => write!(out, "UTC"),
            'z' => write!(out, "+0000"),
            's' => write!(out, "{unix_seconds}"),
            'n' => writeln!(out),
            't' => write!(out, "\t"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=..., separators=...,
/// sort_keys=...)`. Unlike Jinja's own filter it does not escape `<`, `>`, `&` or `'`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson's indent must be a number of spaces or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match (
                parts.first().and_then(|p| p.as_str()),
                parts.get(1).and_then(|p| p.as_str()),
                parts.len(),
            ) {
                (Some(item), Some(key), 2) => (item.to_string(), key.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson's separators must be a pair of strings",
                    ))
                }
            }
        }
        // Python's defaults: no space before a newline when indenting.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let options = JsonOptions {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, &value, &options, 0)?;
    Ok(Value::from(out))
}

struct JsonOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json(
    out: &mut String,
    value: &Value,
    options: &JsonOptions,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String => write_json_string(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        ),
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key), item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), options, depth, |out, i| {
                let (key, item) = &entries[i];
                write_json_string(out, key, options.ensure_ascii);
                out.push_str(&options.key_sep);
                write_json(out, item, options, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), options, depth, |out, i| {
                write_json(out, &items[i], options, depth + 1)
            })?;
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialize a value of kind {}", value.kind()),
            ))
        }
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    options: &JsonOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&options.item_sep);
        }
        if let Some(indent) = &options.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, i)?;
    }
    if let Some(indent) = &options.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python's `json.dumps` turns non-string keys into strings.
fn json_key(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key);
            s
        }
        _ => key.to_string(),
    }
}

fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        // Display prints every integer width minijinja holds (up to 128 bits) in full.
        let _ = write!(out, "{value}");
    } else {
        match f64::try_from(value.clone()) {
            Ok(x) => out.push_str(&python_float_repr(x)),
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        }
    }
}

/// Python's `repr(float)`: the shortest round-tripping digits, scientific below 1e-4 and from 1e16 on.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // "{:e}" gives the shortest round-tripping digits as d.ddde±x.
    let sci = format!("{x:e}");
    let (mantissa, exponent) = match sci.split_once('e') {
        Some((m, e)) => (m.to_string(), e.parse::<i32>().unwrap_or(0)),
        None => (sci.clone(), 0),
    };
    if (-4..16).contains(&exponent) {
        let fixed = format!("{x}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// transformers' `{% generation %}` blocks only mark the assistant's tokens for training masks
/// and print nothing themselves; minijinja has no such tag, so they become `{% if true %}`
/// blocks, keeping any whitespace-control markers they carry.
fn neutralize_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let end = start + len + 2;
        let tag = &rest[start..end];
        let inner = &tag[2..tag.len() - 2];
        let open_marker = inner
            .strip_prefix(['-', '+'])
            .map(|_| &inner[..1])
            .unwrap_or("");
        let close_marker = inner
            .strip_suffix(['-', '+'])
            .map(|_| &inner[inner.len() - 1..])
            .unwrap_or("");
        let word = inner[open_marker.len()..inner.len() - close_marker.len()].trim();
        out.push_str(&rest[..start]);
        match word {
            "generation" => out.push_str(&format!("{{%{open_marker} if true {close_marker}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open_marker} endif {close_marker}%}}")),
            _ => out.push_str(tag),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> String {
        ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))
            .unwrap()
            .render(messages, true)
            .unwrap()
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-07-26 13:05:09");
        assert_eq!(
            strftime("%A, %B %e; %I %p; day %j; %a %%", t),
            "Friday, July 26; 01 PM; day 208; Fri %"
        );
        assert_eq!(strftime("%F %T %Z", 0), "1970-01-01 00:00:00 UTC");
        // Leap day and the day before the epoch.
        assert_eq!(strftime("%F %j", 951_782_400), "2000-02-29 060");
        assert_eq!(strftime("%F %H %a", -1), "1969-12-31 23 Wed");
        assert_eq!(strftime("%q and trailing %", 0), "%q and trailing %");
    }

    #[test]
    fn strftime_now_is_today() {
        let out = render("{{ strftime_now('%Y-%m-%d') }}", &[]);
        let bytes = out.as_bytes();
        assert_eq!(out.len(), 10, "{out}");
        assert!(bytes[4] == b'-' && bytes[7] == b'-', "{out}");
        assert!(out[..4].parse::<i32>().unwrap() >= 2024, "{out}");
    }

    #[test]
    fn python_float_repr_matches_python() {
        for (x, expected) in [
            (2.5, "2.5"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (-3.25, "-3.25"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float_repr(x), expected, "{x}");
        }
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let out = render(
            r#"{{ {"a": [1, 2.0, none, false], "é": "x\"<y>\n\u0001"} | tojson }}"#,
            &[],
        );
        assert_eq!(
            out,
            r#"{"a": [1, 2.0, null, false], "é": "x\"<y>\n\u0001"}"#
        );
        let out = render(
            r#"{{ {"b": {}, "a": []} | tojson(indent=2, sort_keys=true) }}"#,
            &[],
        );
        assert_eq!(out, "{\n  \"a\": [],\n  \"b\": {}\n}");
        let out = render(
            r#"{{ [1, "é"] | tojson(separators=(",", ":"), ensure_ascii=true) }}"#,
            &[],
        );
        assert_eq!(out, r#"[1,"\u00e9"]"#);
        let err = ChatTemplate::new("{{ 1 | tojson(bogus=1) }}", None, None)
            .unwrap()
            .render(&[], false);
        assert!(err.is_err());
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let template =
            ChatTemplate::new("{{ raise_exception('Roles must alternate') }}", None, None).unwrap();
        let err = template.render(&[], false).unwrap_err().to_string();
        assert_eq!(
            err,
            "chat template: the template rejected the conversation: Roles must alternate"
        );
    }

    #[test]
    fn syntax_errors_are_reported_at_construction() {
        let err =
            ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None).unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err:?}");
        assert!(err.to_string().contains("does not compile"), "{err}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source = "{% for m in messages %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% endfor %}";
        assert_eq!(
            render(source, &[ChatMessage::new("assistant", "hi")]),
            "[hi]"
        );
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let out = render(
            source,
            &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
        );
        assert_eq!(out, "U:a\nU:b\n");
    }

    #[test]
    fn undefined_special_tokens_are_undefined() {
        let template =
            ChatTemplate::new("{{ bos_token is defined }} {{ tools is none }}", None, None)
                .unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "False True");
    }

    #[test]
    fn extra_variables_reach_the_template_but_cannot_hide_messages() {
        let template =
            ChatTemplate::new("{{ enable_thinking }} {{ messages | length }}", None, None).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), serde_json::Value::Bool(false));
        extra.insert("messages".into(), serde_json::json!([]));
        let out = template
            .render_with(&[ChatMessage::new("user", "x")], false, &extra)
            .unwrap();
        assert_eq!(out, "False 1");
    }
}
