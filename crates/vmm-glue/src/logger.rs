//! A minimal logger to stderr for the `log` facade, for binaries of this crate.

use std::io::Write;
use std::time::Instant;

/// Logs `[seconds] LEVEL target: message` lines to stderr; the seconds
/// count from the logger's installation, to the microsecond, so the steps of
/// a migration can be timed from its log.
pub struct Logger {
    level: log::LevelFilter,
    start: Instant,
}

impl Logger {
    /// Installs the logger at the level named by environment variable `var` (`error`,
    /// `warn`, `info`, `debug`, `trace`; `info` when unset or unknown).
    pub fn install_from_env(var: &str) {
        let level = std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(log::LevelFilter::Info);
        let logger: &'static Logger = Box::leak(Box::new(Logger {
            level,
            start: Instant::now(),
        }));
        if log::set_logger(logger).is_ok() {
            log::set_max_level(level);
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(
                std::io::stderr(),
                "[{:>11.6}] {} {}: {}",
                self.start.elapsed().as_secs_f64(),
                r.level(),
                r.target(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}
