//! Migration URIs in QEMU's syntax: `tcp:HOST:PORT`, `unix:PATH`,
//! `file:PATH`.
//!
//! An IPv6 host is written in brackets (`tcp:[::1]:4444`). An empty host
//! (`tcp::4444`) means "every interface" when listening and `localhost`
//! when connecting, as in QEMU.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// No `scheme:` prefix.
    #[error("migration URI {uri:?} has no scheme (expected tcp:, unix: or file:)")]
    MissingScheme {
        /// The URI.
        uri: String,
    },
    /// A scheme this crate does not implement (`exec:`, `fd:`, `rdma:`...).
    #[error("unsupported migration URI scheme {scheme:?}")]
    UnsupportedScheme {
        /// The scheme.
        scheme: String,
    },
    /// A `tcp:` URI without `:PORT`.
    #[error("tcp migration URI {uri:?} has no port")]
    MissingPort {
        /// The URI.
        uri: String,
    },
    /// A port that is not a number in 0..=65535.
    #[error("invalid port {port:?} in migration URI")]
    BadPort {
        /// The port text.
        port: String,
    },
    /// An IPv6 address without brackets, or an unclosed bracket.
    #[error("host {host:?} of a tcp migration URI must be bracketed ([::1])")]
    BadHost {
        /// The host text.
        host: String,
    },
    /// A `unix:` or `file:` URI with an empty path.
    #[error("{scheme}: migration URI has an empty path")]
    EmptyPath {
        /// The scheme.
        scheme: &'static str,
    },
}

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`.
    Tcp {
        /// Host name or address, without brackets; empty for "any".
        host: String,
        /// Port; 0 to let the kernel pick when listening.
        port: u16,
    },
    /// `unix:PATH`, a Unix stream socket.
    Unix {
        /// The socket path.
        path: PathBuf,
    },
    /// `file:PATH`: the source writes the main channel to a file, the
    /// destination reads it back. There is no return path.
    File {
        /// The file path.
        path: PathBuf,
    },
}

impl MigrationUri {
    /// Parses a URI (same as `str::parse`).
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        uri.parse()
    }
}

impl FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        let Some((scheme, rest)) = uri.split_once(':') else {
            return Err(UriError::MissingScheme { uri: uri.into() });
        };
        match scheme {
            "tcp" => parse_tcp(uri, rest),
            "unix" | "file" => {
                let scheme = if scheme == "unix" { "unix" } else { "file" };
                if rest.is_empty() {
                    return Err(UriError::EmptyPath { scheme });
                }
                let path = PathBuf::from(rest);
                Ok(if scheme == "unix" {
                    MigrationUri::Unix { path }
                } else {
                    MigrationUri::File { path }
                })
            }
            other => Err(UriError::UnsupportedScheme {
                scheme: other.into(),
            }),
        }
    }
}

fn parse_tcp(uri: &str, rest: &str) -> Result<MigrationUri, UriError> {
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(UriError::BadHost { host: rest.into() });
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(UriError::MissingPort { uri: uri.into() });
        };
        (host, port)
    } else {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(UriError::MissingPort { uri: uri.into() });
        };
        if host.contains(':') || host.contains('[') || host.contains(']') {
            return Err(UriError::BadHost { host: host.into() });
        }
        (host, port)
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| UriError::BadPort { port: port.into() })?;
    Ok(MigrationUri::Tcp {
        host: host.into(),
        port,
    })
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix { path } => write!(f, "unix:{}", path.display()),
            MigrationUri::File { path } => write!(f, "file:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_syntax() {
        assert_eq!(
            MigrationUri::parse("tcp:10.0.0.2:4444").unwrap(),
            MigrationUri::Tcp {
                host: "10.0.0.2".into(),
                port: 4444
            }
        );
        assert_eq!(
            MigrationUri::parse("tcp:[::1]:5").unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 5
            }
        );
        assert_eq!(
            MigrationUri::parse("tcp::4444").unwrap(),
            MigrationUri::Tcp {
                host: String::new(),
                port: 4444
            }
        );
        assert_eq!(
            MigrationUri::parse("unix:/run/mig.sock").unwrap(),
            MigrationUri::Unix {
                path: "/run/mig.sock".into()
            }
        );
        assert_eq!(
            MigrationUri::parse("file:/tmp/a:b").unwrap(),
            MigrationUri::File {
                path: "/tmp/a:b".into()
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "tcp:host.example:1",
            "tcp:[fe80::1]:65535",
            "tcp::0",
            "unix:rel/sock",
            "file:/x",
        ] {
            assert_eq!(MigrationUri::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_uris() {
        use UriError::*;
        type Check = fn(&UriError) -> bool;
        let cases: [(&str, Check); 9] = [
            ("localhost", |e| matches!(e, MissingScheme { .. })),
            ("exec:cat", |e| matches!(e, UnsupportedScheme { .. })),
            ("TCP:a:1", |e| matches!(e, UnsupportedScheme { .. })),
            ("tcp:host", |e| matches!(e, MissingPort { .. })),
            ("tcp:host:99999", |e| matches!(e, BadPort { .. })),
            ("tcp:host:", |e| matches!(e, BadPort { .. })),
            ("tcp:::1:4444", |e| matches!(e, BadHost { .. })),
            ("tcp:[::1:4444", |e| matches!(e, BadHost { .. })),
            ("unix:", |e| matches!(e, EmptyPath { .. })),
        ];
        for (uri, ok) in cases {
            let e = MigrationUri::parse(uri).unwrap_err();
            assert!(ok(&e), "{uri}: {e:?}");
        }
        assert!(matches!(
            MigrationUri::parse("tcp:[::1]"),
            Err(MissingPort { .. })
        ));
    }
}
