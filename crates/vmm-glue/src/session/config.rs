//! The session's typed vocabulary: QEMU's migration states and run states,
//! capabilities, parameters, status with statistics, and events.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use migration_ram::postcopy::FaultStats;
use migration_ram::snapshot::WriteFaultStats;
use migration_ram::RamStatsSnapshot;
use migration_stream::MigrationUri;

use super::error::{SessionError, UsageError};
use super::state::GuestExit;

/// QEMU's migration states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Connecting and announcing RAM (source); listening (destination).
    Setup,
    /// Pages moving.
    Active,
    /// Postcopy running.
    PostcopyActive,
    /// Postcopy lost its link and waits for recovery.
    PostcopyPaused,
    /// Postcopy recovery starting.
    PostcopyRecoverSetup,
    /// Postcopy recovering.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed; [`MigrationInfo::error`] says why.
    Failed,
    /// Cancel requested.
    Cancelling,
    /// Cancelled.
    Cancelled,
}

impl MigrationStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    /// Whether a migration is under way (a new one cannot start).
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::Cancelling
        )
    }

    /// Whether this is a final state (completed, failed, cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's run states, as `query-status` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// Stopped by the operator (or never started).
    Paused,
    /// Waiting for an incoming migration.
    InMigrate,
    /// Paused for the last pass of an outgoing migration.
    FinishMigrate,
    /// Stopped after migrating away (or after a migration whose outcome the
    /// destination did not confirm).
    PostMigrate,
    /// The guest shut down (or reset, or triple-faulted).
    Shutdown,
    /// A vCPU hit an error the hypervisor cannot handle.
    InternalError,
}

impl RunState {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A migration capability (QEMU's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// `postcopy-ram`: the destination may run before all RAM arrived.
    PostcopyRam,
    /// `postcopy-preempt`: urgent pages on a channel of their own.
    PostcopyPreempt,
    /// `postcopy-blocktime`: the destination measures how long vCPUs wait.
    PostcopyBlocktime,
    /// `background-snapshot`: save RAM once, under write protection.
    BackgroundSnapshot,
}

impl Capability {
    /// Every capability, in QEMU's order.
    pub const ALL: [Capability; 4] = [
        Capability::PostcopyRam,
        Capability::PostcopyPreempt,
        Capability::PostcopyBlocktime,
        Capability::BackgroundSnapshot,
    ];

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Capability::PostcopyRam => "postcopy-ram",
            Capability::PostcopyPreempt => "postcopy-preempt",
            Capability::PostcopyBlocktime => "postcopy-blocktime",
            Capability::BackgroundSnapshot => "background-snapshot",
        }
    }

    /// The capability named `name`.
    pub fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether this build implements it.
    pub fn available(self) -> bool {
        matches!(
            self,
            Capability::PostcopyRam
                | Capability::PostcopyPreempt
                | Capability::PostcopyBlocktime
                | Capability::BackgroundSnapshot
        )
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Pairs of capabilities that cannot be on together, each refused with an
/// error that names both. A background snapshot saves RAM as it was at one
/// instant while the guest keeps running here: a destination that runs the
/// guest (postcopy) or measures its waits (blocktime) contradicts that.
pub const INCOMPATIBLE: [(Capability, Capability); 3] = [
    (Capability::BackgroundSnapshot, Capability::PostcopyRam),
    (Capability::BackgroundSnapshot, Capability::PostcopyPreempt),
    (
        Capability::BackgroundSnapshot,
        Capability::PostcopyBlocktime,
    ),
];

/// How a snapshot file is restored ([`Session::restore`](super::Session::restore)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RestoreMode {
    /// Every page is read into guest memory before the guest runs.
    #[default]
    Eager,
    /// The guest runs at once; a page it touches is read from the file on
    /// the spot, and a background fill reads the rest.
    Lazy,
}

impl RestoreMode {
    /// The name (`eager`, `lazy`).
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreMode::Eager => "eager",
            RestoreMode::Lazy => "lazy",
        }
    }

    /// The mode named `name`.
    pub fn from_name(name: &str) -> Option<RestoreMode> {
        match name {
            "eager" => Some(RestoreMode::Eager),
            "lazy" => Some(RestoreMode::Lazy),
            _ => None,
        }
    }
}

impl fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Capabilities that need another one on.
pub const REQUIRES: [(Capability, Capability); 1] =
    [(Capability::PostcopyPreempt, Capability::PostcopyRam)];

/// A set of capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(u8);

impl Capabilities {
    /// Whether `cap` is on.
    pub fn get(self, cap: Capability) -> bool {
        self.0 & cap.bit() != 0
    }

    /// Turns `cap` on or off.
    pub fn set(&mut self, cap: Capability, on: bool) {
        if on {
            self.0 |= cap.bit();
        } else {
            self.0 &= !cap.bit();
        }
    }

    /// The capabilities that are on.
    pub fn enabled(self) -> impl Iterator<Item = Capability> {
        Capability::ALL.into_iter().filter(move |c| self.get(*c))
    }

    /// Checks the combination against [`INCOMPATIBLE`] and [`REQUIRES`].
    pub fn validate(self) -> Result<(), UsageError> {
        if let Some((a, b)) = INCOMPATIBLE
            .iter()
            .find(|(a, b)| self.get(*a) && self.get(*b))
        {
            return Err(UsageError::IncompatibleCapabilities(*a, *b));
        }
        if let Some((a, b)) = REQUIRES.iter().find(|(a, b)| self.get(*a) && !self.get(*b)) {
            return Err(UsageError::CapabilityRequires(*a, *b));
        }
        Ok(())
    }
}

/// QEMU's largest `downtime-limit`, in milliseconds.
pub const MAX_DOWNTIME_MS: u64 = 2_000_000;

/// The default link timeout: how long a peer may say nothing before the link
/// counts as broken.
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(20);

/// The tunables of a migration (QEMU's `migrate-set-parameters`, plus the
/// link timeout). They may change while a migration runs and apply at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Parameters {
    /// Bandwidth cap of precopy in bytes per second; 0 is unlimited.
    pub max_bandwidth: u64,
    /// How long the guest may stay paused at switchover.
    pub downtime_limit: Duration,
    /// Bandwidth cap of the postcopy background stream; 0 is unlimited.
    pub max_postcopy_bandwidth: u64,
    /// How long a peer may send and read nothing before the link counts as
    /// broken (1 s to 1 h). The destination also drops a connection whose
    /// hello does not arrive in this time, and keeps listening.
    pub link_timeout: Duration,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            max_bandwidth: migration_ram::stats::DEFAULT_MAX_BANDWIDTH,
            downtime_limit: migration_ram::stats::DEFAULT_DOWNTIME_LIMIT,
            max_postcopy_bandwidth: 0,
            link_timeout: DEFAULT_LINK_TIMEOUT,
        }
    }
}

impl Parameters {
    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), UsageError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if ms(self.downtime_limit) > MAX_DOWNTIME_MS {
            return Err(UsageError::Parameter {
                name: "downtime-limit",
                range: "0 to 2000000 ms",
                value: ms(self.downtime_limit),
            });
        }
        if !(1_000..=3_600_000).contains(&ms(self.link_timeout)) {
            return Err(UsageError::Parameter {
                name: "x-link-timeout",
                range: "1000 to 3600000 ms",
                value: ms(self.link_timeout),
            });
        }
        Ok(())
    }
}

/// How a migration ended badly, as [`MigrationInfo`] reports it.
pub type Failure = Arc<SessionError>;

/// The status of the current (or last) migration and its statistics: QEMU's
/// `query-migrate`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MigrationInfo {
    /// The state.
    pub status: MigrationStatus,
    /// Time since the migration started, or its whole duration once over.
    pub total_time: Option<Duration>,
    /// Time to connect and announce RAM (source).
    pub setup_time: Option<Duration>,
    /// How long the guest was paused at switchover (source, once over).
    pub downtime: Option<Duration>,
    /// RAM statistics.
    pub ram: Option<RamStatsSnapshot>,
    /// Where the destination listens.
    pub socket_address: Option<MigrationUri>,
    /// Why it failed: typed, with its [`SessionError::kind`].
    pub error: Option<Failure>,
    /// Connections the destination dropped before one said a valid hello.
    pub rejected_connections: u64,
    /// A postcopy destination's fault handling: faults, requests, blocktime
    /// (total, per vCPU, latency histogram); for a lazy restore, the faults
    /// served from the file.
    pub postcopy: Option<FaultStats>,
    /// A background snapshot's write faults and what they cost the guest
    /// (source, once the save ended).
    pub snapshot: Option<WriteFaultStats>,
    /// How the snapshot file being restored is read (destination of a
    /// restore).
    pub restore_mode: Option<RestoreMode>,
}

/// Something the operator may want to know, delivered to subscribers
/// ([`Session::subscribe`](super::Session::subscribe)) without ever blocking
/// the session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The migration state changed (QEMU's `MIGRATION`).
    Migration(MigrationStatus),
    /// The guest stopped (QEMU's `STOP`).
    Stop,
    /// The guest runs again (QEMU's `RESUME`).
    Resume,
    /// The guest stopped on its own (QEMU's `SHUTDOWN`, or an internal error).
    GuestExit(GuestExit),
}
