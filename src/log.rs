//! Minimal logging to stderr: `level=... msg=...` lines with a UNIX timestamp.
//! `RINGWAY_LOG=warn` (or `error`, `off`) quiets it; `RINGWAY_LOG=debug` adds per-connection
//! events such as failed TLS handshakes.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);
static INIT: OnceLock<()> = OnceLock::new();

pub fn enabled(level: Level) -> bool {
    INIT.get_or_init(|| {
        let l = match std::env::var("RINGWAY_LOG").as_deref() {
            Ok("off") => 0,
            Ok("error") => 1,
            Ok("warn") => 2,
            Ok("debug") => 4,
            _ => 3,
        };
        LEVEL.store(l, Ordering::Relaxed);
    });
    (level as u8) <= LEVEL.load(Ordering::Relaxed)
}

/// The level in force; `None`: logging is off.
pub fn level() -> Option<Level> {
    // Runs the one-time `RINGWAY_LOG` read first.
    let _ = enabled(Level::Error);
    match LEVEL.load(Ordering::Relaxed) {
        1 => Some(Level::Error),
        2 => Some(Level::Warn),
        3 => Some(Level::Info),
        4 => Some(Level::Debug),
        _ => None,
    }
}

/// Sets the level at run time (the admin API's `PUT /log/level`); `None` turns logging off.
pub fn set_level(level: Option<Level>) {
    // The one-time `RINGWAY_LOG` read runs first, so that it cannot undo this later.
    let _ = enabled(Level::Error);
    LEVEL.store(level.map_or(0, |l| l as u8), Ordering::Relaxed);
}

pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let l = match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
    };
    eprintln!("{}.{:03} {l} {args}", now.as_secs(), now.subsec_millis());
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
