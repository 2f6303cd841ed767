//! The event log, to stderr: one line per event, as text
//! (`2026-11-26T05:38:17.123Z info message`) or as JSON
//! (`{"time":"2026-11-26T05:38:17.123Z","level":"info","msg":"message"}`), times in RFC 3339
//! UTC with milliseconds.
//!
//! The level and format come from `[log]` in the config ([`init`]); `RINGWAY_LOG=warn` (or
//! `error`, `off`, `info`, `debug`) overrides the configured level; `RINGWAY_LOG=debug` adds
//! per-connection events such as failed TLS handshakes. [`set_level`] changes the level at run
//! time (the admin API calls it). Events are rare (never one per request), so a line is
//! formatted into a `String` and written with one call.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use serde::Deserialize;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn as_str(&self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// "off" is `None`.
    pub fn parse(s: &str) -> Result<Option<Level>, String> {
        Ok(Some(match s {
            "off" => return Ok(None),
            "error" => Level::Error,
            "warn" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            _ => {
                return Err(format!(
                    "unknown log level {s:?} (off, error, warn, info, debug)"
                ))
            }
        }))
    }
}

/// `[log] format`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "off", "error", "warn", "info" (default) or "debug".
    #[serde(default = "d_level", deserialize_with = "de_level")]
    pub level: Option<Level>,
    #[serde(default)]
    pub format: Format,
}

fn d_level() -> Option<Level> {
    Some(Level::Info)
}

fn de_level<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Level>, D::Error> {
    let s = String::deserialize(d)?;
    Level::parse(&s).map_err(serde::de::Error::custom)
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: d_level(),
            format: Format::Text,
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(0);
static FORMAT: AtomicU8 = AtomicU8::new(0);
static INIT: OnceLock<()> = OnceLock::new();

/// The level `RINGWAY_LOG` asks for, if it is set (and valid).
fn env_level() -> Option<Option<Level>> {
    std::env::var("RINGWAY_LOG")
        .ok()
        .and_then(|v| Level::parse(&v).ok())
}

fn env_init() {
    INIT.get_or_init(|| {
        let l = env_level().unwrap_or(Some(Level::Info));
        LEVEL.store(l.map_or(0, |l| l as u8), Ordering::Relaxed);
    });
}

/// Applies `[log]`: its format, and its level unless `RINGWAY_LOG` overrides it.
pub fn init(cfg: &LogConfig) {
    env_init();
    set_format(cfg.format);
    if env_level().is_none() {
        set_level(cfg.level);
    }
}

/// Sets the level at run time (`None`: off).
pub fn set_level(level: Option<Level>) {
    env_init();
    LEVEL.store(level.map_or(0, |l| l as u8), Ordering::Relaxed);
}

/// The current level (`None`: off).
pub fn level() -> Option<Level> {
    env_init();
    match LEVEL.load(Ordering::Relaxed) {
        1 => Some(Level::Error),
        2 => Some(Level::Warn),
        3 => Some(Level::Info),
        4 => Some(Level::Debug),
        _ => None,
    }
}

pub fn set_format(f: Format) {
    FORMAT.store(f as u8, Ordering::Relaxed);
}

pub fn format() -> Format {
    match FORMAT.load(Ordering::Relaxed) {
        1 => Format::Json,
        _ => Format::Text,
    }
}

pub fn enabled(level: Level) -> bool {
    env_init();
    (level as u8) <= LEVEL.load(Ordering::Relaxed)
}

/// One event line, without its line feed. In text, control characters of the message (a
/// line feed in a config parser's message, an escape sequence in text that came from outside)
/// are written escaped (`\n`, `\r`, `\x1b`), so that each event stays one line and a
/// terminal shows the text as it was; JSON escapes them its own way.
pub fn line(level: Level, format: Format, unix_ms: u64, args: std::fmt::Arguments<'_>) -> String {
    let time = crate::date::rfc3339_millis(unix_ms);
    let time = std::str::from_utf8(&time).unwrap_or("");
    match format {
        Format::Text => {
            use std::fmt::Write;
            let mut out = format!("{time} {} ", level.as_str());
            let _ = Escaped(&mut out).write_fmt(args);
            out
        }
        Format::Json => {
            let msg = serde_json::Value::String(args.to_string());
            format!(
                "{{\"time\":\"{time}\",\"level\":\"{}\",\"msg\":{msg}}}",
                level.as_str()
            )
        }
    }
}

/// Writes text into a `String` with control characters escaped (see [`line`]); a tab stays.
struct Escaped<'a>(&'a mut String);

impl std::fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            match c {
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push('\t'),
                c if c.is_control() => write!(self.0, "\\x{:02x}", c as u32)?,
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    let mut l = line(level, format(), crate::date::unix_millis(), args);
    l.push('\n');
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(l.as_bytes());
}

#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { if $crate::log::enabled($crate::log::Level::Info) { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) } };
}
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { if $crate::log::enabled($crate::log::Level::Debug) { $crate::log::write($crate::log::Level::Debug, format_args!($($t)*)) } };
}
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { if $crate::log::enabled($crate::log::Level::Warn) { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) } };
}
#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { if $crate::log::enabled($crate::log::Level::Error) { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) } };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_text_and_json() {
        let t = line(
            Level::Warn,
            Format::Text,
            1_795_671_497_123,
            format_args!("a {}", 1),
        );
        assert_eq!(t, "2026-11-26T05:38:17.123Z warn a 1");
        let j = line(
            Level::Info,
            Format::Json,
            1_795_671_497_123,
            format_args!("quote \" and\nline"),
        );
        let v: serde_json::Value = serde_json::from_str(&j).expect("json");
        assert_eq!(v["time"], "2026-11-26T05:38:17.123Z");
        assert_eq!(v["level"], "info");
        assert_eq!(v["msg"], "quote \" and\nline");
        // Text: one line whatever the message holds.
        let t = line(
            Level::Error,
            Format::Text,
            1_795_671_497_123,
            format_args!("a\nb\r\n{}\tc\u{7f}", "\x1b[2J"),
        );
        assert_eq!(
            t,
            "2026-11-26T05:38:17.123Z error a\\nb\\r\\n\\x1b[2J\tc\\x7f"
        );
    }

    #[test]
    fn the_level_is_settable_at_run_time() {
        let before = level();
        set_level(Some(Level::Error));
        assert!(enabled(Level::Error) && !enabled(Level::Warn));
        set_level(None);
        assert!(!enabled(Level::Error));
        set_level(Some(Level::Debug));
        assert!(enabled(Level::Debug));
        assert_eq!(level(), Some(Level::Debug));
        set_level(before);
    }

    #[test]
    fn levels_parse() {
        assert_eq!(Level::parse("off"), Ok(None));
        assert_eq!(Level::parse("warn"), Ok(Some(Level::Warn)));
        assert!(Level::parse("loud").is_err());
    }
}
