//! Keepalive: how a source notices a destination that stopped answering.
//!
//! A peer that dies without closing its socket (a host that lost power, a
//! network partition) leaves the source writing into a void for as long as
//! the kernel buffers take it, and a rate-limited source may write nothing
//! for seconds at a time. So, while it runs, the saver writes
//! [`Command::Ping`] on the main channel
//! at least every [`Keepalive::interval`], and whoever reads the return
//! path calls [`PeerLiveness::heard`] on each `Pong` (or on any message).
//! When the peer has been silent for longer than [`Keepalive::timeout`]
//! since the first ping, the saver fails with
//! [`Error::PeerSilent`], of kind
//! [`ErrorKind::Link`](migration_stream::ErrorKind::Link).
//!
//! ```text
//!  saver thread                         return-path thread
//!  ── chunk ── Ping(1) ── chunk ──      <- Pong(1): liveness.heard()
//!  ── (rate limiter waits) Ping(2) ──   <- Pong(2): liveness.heard()
//!  ── chunk ── Ping(3) ── ...           (nothing: after `timeout`, the
//!                                        saver fails with PeerSilent)
//! ```
//!
//! The check runs between chunks and in every slice of a rate-limiter
//! wait, so even a 1 byte/s limit pings. It cannot run while a write is
//! blocked in the kernel on a full socket: a watchdog thread that sees
//! [`PeerLiveness::silence`] grow past the timeout shuts the connection
//! down, which ends that write. File migrations have no peer and use no
//! keepalive.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_stream::{Command, StreamWriter};

use crate::error::{Error, Result};
use crate::stats::RamStats;

/// When the peer was last heard from, shared between the thread that reads
/// the return path (which calls [`heard`](PeerLiveness::heard)) and the
/// saver (which checks it). One atomic; no lock.
#[derive(Debug)]
pub struct PeerLiveness {
    base: Instant,
    /// Nanoseconds from `base` to the last `heard`.
    last_ns: AtomicU64,
}

impl Default for PeerLiveness {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerLiveness {
    /// A liveness that heard the peer now (create it when the connection is
    /// established).
    pub fn new() -> Self {
        PeerLiveness {
            base: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    /// A shared one, as [`Keepalive`] takes it.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::new())
    }

    /// Records that the peer answered now (a `Pong`, or any return-path
    /// message).
    pub fn heard(&self) {
        self.heard_at(Instant::now());
    }

    /// Records that the peer answered at `at` (never moves backwards).
    pub fn heard_at(&self, at: Instant) {
        let ns =
            u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        self.last_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// When the peer was last heard from.
    pub fn last_heard(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }

    /// How long the peer has been silent at `now`.
    pub fn silence_at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard())
    }

    /// How long the peer has been silent.
    pub fn silence(&self) -> Duration {
        self.silence_at(Instant::now())
    }
}

/// The keepalive of a [`PrecopySaver`](crate::PrecopySaver).
#[derive(Debug, Clone)]
pub struct Keepalive {
    /// Longest time between two pings while the saver runs.
    pub interval: Duration,
    /// Longest silence of the peer (counted from the first ping at the
    /// earliest) before the saver fails. Give it a few intervals: an
    /// answer takes a round trip.
    pub timeout: Duration,
    /// Where the return-path reader records answers.
    pub liveness: Arc<PeerLiveness>,
}

impl Keepalive {
    /// A keepalive over `liveness`.
    pub fn new(interval: Duration, timeout: Duration, liveness: Arc<PeerLiveness>) -> Self {
        Keepalive {
            interval,
            timeout,
            liveness,
        }
    }
}

/// The saver's side of a keepalive: when it last pinged, and with what.
#[derive(Debug)]
pub(crate) struct KeepaliveState {
    config: Keepalive,
    /// First ping: silence before it is not the peer's fault.
    first_ping: Option<Instant>,
    last_ping: Option<Instant>,
    next_value: u32,
}

impl KeepaliveState {
    pub(crate) fn new(config: Keepalive) -> Self {
        KeepaliveState {
            config,
            first_ping: None,
            last_ping: None,
            next_value: 1,
        }
    }

    /// Fails if the peer has been silent too long, else pings on `w`
    /// (flushed) if the last ping is `interval` old. `now` is the caller's
    /// clock read.
    pub(crate) fn tick<W: Write>(
        &mut self,
        now: Instant,
        w: &mut StreamWriter<W>,
        stats: &RamStats,
    ) -> Result<()> {
        if let Some(first) = self.first_ping {
            let since = self.config.liveness.last_heard().max(first);
            let silent = now.saturating_duration_since(since);
            if silent > self.config.timeout {
                return Err(Error::PeerSilent {
                    silent,
                    timeout: self.config.timeout,
                });
            }
        }
        let due = self
            .last_ping
            .is_none_or(|last| now.saturating_duration_since(last) >= self.config.interval);
        if due {
            let before = w.bytes_written();
            let value = self.next_value;
            self.next_value = self.next_value.wrapping_add(1);
            let result = w
                .write_command(&Command::Ping { value })
                .and_then(|()| w.flush());
            stats.add_transferred(w.bytes_written() - before);
            result?;
            self.first_ping.get_or_insert(now);
            self.last_ping = Some(now);
        }
        Ok(())
    }
}

/// Ticks `state` if there is one.
pub(crate) fn tick<W: Write>(
    state: &mut Option<KeepaliveState>,
    now: Instant,
    w: &mut StreamWriter<W>,
    stats: &RamStats,
) -> Result<()> {
    match state {
        Some(s) => s.tick(now, w, stats),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use migration_stream::{BlockTable, ErrorKind, Record, StreamReader};

    use super::*;

    fn pings(bytes: &[u8]) -> Vec<u32> {
        let mut r = StreamReader::new(bytes);
        let t = BlockTable::new(Vec::new()).unwrap();
        let mut out = Vec::new();
        loop {
            match r.read_record(&t) {
                Ok(Record::Command(Command::Ping { value })) => out.push(value),
                Ok(other) => panic!("{other:?}"),
                Err(migration_stream::Error::Closed) => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn pings_every_interval_and_fails_after_the_timeout() {
        let liveness = PeerLiveness::shared();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut k = KeepaliveState::new(Keepalive::new(
            Duration::from_millis(100),
            Duration::from_millis(350),
            liveness.clone(),
        ));
        let mut w = StreamWriter::new(Vec::new());
        let stats = RamStats::new();
        for at in [0, 50, 99, 100, 150, 250] {
            k.tick(ms(at), &mut w, &stats).unwrap();
        }
        // Answers up to 200 ms, then silence.
        liveness.heard_at(ms(200));
        liveness.heard_at(ms(120));
        assert_eq!(liveness.last_heard(), ms(200), "never moves backwards");
        k.tick(ms(550), &mut w, &stats).unwrap();
        let err = k.tick(ms(551), &mut w, &stats).unwrap_err();
        assert!(
            matches!(err, Error::PeerSilent { silent, .. } if silent == Duration::from_millis(351)),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Link);
        assert_eq!(
            err.to_string(),
            "no answer from the peer for 0.351 s (timeout 0.350 s)"
        );
        let bytes = w.into_inner().unwrap();
        assert_eq!(stats.snapshot().transferred, bytes.len() as u64);
        assert_eq!(pings(&bytes), vec![1, 2, 3, 4]);
    }

    #[test]
    fn silence_before_the_first_ping_does_not_count() {
        let liveness = PeerLiveness::shared();
        let mut k = KeepaliveState::new(Keepalive::new(
            Duration::from_secs(1),
            Duration::from_millis(10),
            liveness.clone(),
        ));
        let late = liveness.last_heard() + Duration::from_secs(60);
        let mut w = StreamWriter::new(Vec::new());
        k.tick(late, &mut w, &RamStats::new()).unwrap();
        assert!(liveness.silence_at(late) >= Duration::from_secs(60));
    }
}
