//! The session's errors: typed from the socket to what the operator sees.
//!
//! Every failure of a migration keeps the error that caused it, and
//! [`SessionError::kind`] says whose fault it is ([`ErrorKind::Link`],
//! [`ErrorKind::Protocol`] or [`ErrorKind::Local`]). Calls refused because of
//! the session's state or bad arguments are [`SessionError::Usage`] errors,
//! apart from migration failures.

use migration_stream::{ErrorKind, TransportError, UriError};

use super::config::Capability;
use super::state::StateError;

/// A call the session refuses: its state or its arguments do not allow it.
/// Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// A migration (outgoing or incoming) is in progress.
    #[error("a migration is already in progress")]
    InProgress,
    /// The VM waits for an incoming migration and cannot migrate out.
    #[error("the guest is waiting for an incoming migration")]
    WaitingForIncoming,
    /// `incoming` was not asked for (`--incoming`) or already started.
    #[error("{0}")]
    Incoming(&'static str),
    /// The guest is paused for a migration's last pass.
    #[error("a migration is completing its last pass")]
    Switchover,
    /// The guest stopped on its own and cannot run again.
    #[error("the guest stopped ({0}) and cannot run again")]
    GuestStopped(String),
    /// Two capabilities that cannot be on together.
    #[error("capability {0} cannot be combined with {1}")]
    IncompatibleCapabilities(Capability, Capability),
    /// A capability that needs another.
    #[error("capability {0} requires {1}")]
    CapabilityRequires(Capability, Capability),
    /// A capability this build does not implement yet.
    #[error("capability {0} is not available in this build (planned)")]
    Unavailable(Capability),
    /// A parameter out of range.
    #[error("parameter {name} must be {range}, not {value}")]
    Parameter {
        /// QEMU's name of the parameter.
        name: &'static str,
        /// The accepted range.
        range: &'static str,
        /// The value given.
        value: u64,
    },
    /// Postcopy was asked for, but the capability is off.
    #[error(
        "postcopy is not enabled: turn the postcopy-ram capability on before the migration starts"
    )]
    PostcopyNotEnabled,
    /// Postcopy was asked for when no outgoing migration runs.
    #[error("postcopy can start only while an outgoing migration is active")]
    NoActiveMigration,
    /// Postcopy needs a return path for the destination's page requests (a
    /// `file:` migration has none).
    #[error("postcopy needs a return path for page requests; file: migrations have none")]
    PostcopyNeedsReturnPath,
    /// Postcopy preempt opens a second connection to the destination's
    /// address: a migration over a connection the VMM made has none.
    #[error(
        "postcopy-preempt opens a second connection to the destination, so it needs a migration \
         URI (tcp: or unix:), not a connection given by the VMM"
    )]
    PreemptNeedsUri,
    /// A restore was asked of a file that is not a snapshot file (a
    /// migration stream saved to a file loads with `incoming`, eagerly).
    #[error(
        "{0} is not a snapshot file (a background snapshot writes those; a migration stream \
         saved to a file is loaded with migrate-incoming, and only eagerly)"
    )]
    NotASnapshot(String),
    /// The file named for a restore cannot be opened or read.
    #[error("cannot read the snapshot file {0}: {1}")]
    SnapshotUnreadable(String, String),
    /// The migration URI does not parse.
    #[error(transparent)]
    Uri(#[from] UriError),
}

/// Why a migration failed, or why a call was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The call is not allowed now or its arguments are wrong.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// A connection could not be made or accepted.
    #[error("transport")]
    Transport(#[from] TransportError),
    /// The stream or its channel failed.
    #[error("migration stream")]
    Stream(#[from] migration_stream::Error),
    /// Moving RAM failed.
    #[error("RAM")]
    Ram(#[from] migration_ram::Error),
    /// A vCPU or device state could not be saved or loaded.
    #[error("{what}")]
    State {
        /// `vCPUs` or `device "serial"`.
        what: String,
        /// The cause.
        #[source]
        source: StateError,
    },
    /// The peer broke the protocol (an unexpected record, a missing or
    /// unknown state section).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The destination answered that it could not load the migration.
    #[error("the destination failed to load the migration (status {status}); {guest}")]
    Refused {
        /// The status the destination sent.
        status: u32,
        /// What became of the guest here.
        guest: &'static str,
    },
    /// The link broke after the guest's last state was sent and before the
    /// destination confirmed it: the guest may run there, so it stays paused
    /// here.
    #[error(
        "no confirmation from the destination after the last state was sent: the guest stays \
         paused here because it may be running on the destination"
    )]
    Unconfirmed(#[source] Box<SessionError>),
    /// The peer said nothing for the link timeout.
    #[error("no answer from the peer for {0:.1} s (link timeout)")]
    Timeout(f64),
    /// The link ended before the protocol did.
    #[error("the peer closed the connection")]
    PeerGone,
    /// The operator cancelled the migration.
    #[error("the migration was cancelled")]
    Cancelled,
    /// A thread could not be started, or another resource of this host
    /// failed.
    #[error("{what}")]
    Host {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl SessionError {
    /// Whose fault this is: [`ErrorKind::Link`], [`ErrorKind::Protocol`] or
    /// [`ErrorKind::Local`] (usage errors and cancels count as local).
    pub fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Usage(_) | SessionError::Cancelled | SessionError::Host { .. } => {
                ErrorKind::Local
            }
            SessionError::Transport(e) => e.kind(),
            SessionError::Stream(e) => e.kind(),
            SessionError::Ram(e) => e.kind(),
            SessionError::State { source, .. } => source.kind(),
            SessionError::Protocol(_) => ErrorKind::Protocol,
            // The destination's own verdict: it could not take the state; its
            // error-desc says why.
            SessionError::Refused { .. } => ErrorKind::Protocol,
            SessionError::Unconfirmed(_) | SessionError::Timeout(_) | SessionError::PeerGone => {
                ErrorKind::Link
            }
        }
    }

    /// The error and its sources joined with `: `, prefixed by its kind
    /// (`link error: ...`): what `query-migrate` shows as `error-desc`.
    pub fn describe(&self) -> String {
        let chain = crate::error_chain(self);
        match self {
            SessionError::Usage(_) | SessionError::Cancelled => chain,
            _ => format!("{} error: {chain}", self.kind()),
        }
    }

    pub(crate) fn state(what: impl Into<String>, source: StateError) -> Self {
        SessionError::State {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn kinds_follow_the_cause() {
        let reset = migration_stream::Error::Io {
            context: "reading a frame",
            source: io::Error::from(io::ErrorKind::ConnectionReset),
        };
        let e = SessionError::from(migration_ram::Error::from(reset));
        assert_eq!(e.kind(), ErrorKind::Link);
        assert!(
            e.describe().starts_with("link error: RAM: "),
            "{}",
            e.describe()
        );

        let bad = migration_stream::Error::BadMagic {
            found: 0,
            expected: migration_stream::MAGIC,
        };
        assert_eq!(SessionError::from(bad).kind(), ErrorKind::Protocol);

        let full = migration_stream::Error::Io {
            context: "writing",
            source: io::Error::from_raw_os_error(28),
        };
        assert_eq!(SessionError::from(full).kind(), ErrorKind::Local);

        let malformed = SessionError::state("vCPUs", StateError::malformed("regs", "short"));
        assert_eq!(malformed.kind(), ErrorKind::Protocol);
        let unfit = SessionError::state("vCPUs", StateError::incompatible("xsave", "too big"));
        assert_eq!(unfit.kind(), ErrorKind::Local);
        assert_eq!(
            SessionError::Unconfirmed(Box::new(SessionError::PeerGone)).kind(),
            ErrorKind::Link
        );
        assert_eq!(
            SessionError::from(UsageError::InProgress).describe(),
            "a migration is already in progress"
        );
    }
}
