//! The `[admin]` section: where the admin API listens and who may call it.
//!
//! The admin listener runs when the section is present (`enabled = false` turns it off). A
//! listener on an address other than loopback needs a bearer token (`token`, or `token_env`
//! naming an environment variable read when the config loads): the config is refused
//! otherwise, so that a typo in `address` never opens the gateway's controls to a network.

use std::time::Duration;

use serde::Deserialize;

use crate::auth::config::Secret;
use crate::config::{Addr, Dur, OptDur};

/// The default admin address: loopback only.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9901";
/// Shortest token accepted: a bearer token is the only guard of a non-loopback admin API, so
/// it must not be guessable (16 characters of a random string hold well over 64 bits).
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (it must fit in a request head with room to spare).
pub const MAX_TOKEN_LEN: usize = 1024;
/// Most admin connections (`max_connections`): each is served by a thread of its own.
pub const MAX_ADMIN_CONNECTIONS: usize = 1024;
/// Longest `drain_delay`: an hour.
pub const MAX_DRAIN_DELAY: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Run the admin listener (default: true once the `[admin]` section is present).
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// `host:port` to listen on (default 127.0.0.1:9901).
    #[serde(default = "d_address")]
    pub address: Addr,
    /// Bearer token every admin request must carry (`Authorization: Bearer ...`), except the
    /// `GET /live` and `GET /ready` probes. Required off loopback.
    #[serde(default)]
    pub token: Option<Secret>,
    /// The name of an environment variable holding the token (read when the config loads),
    /// so that the token stays out of the file. Exclusive with `token`.
    #[serde(default)]
    pub token_env: Option<String>,
    /// `POST /drain`: time between failing readiness and closing the data-plane listeners,
    /// for load balancers to notice. `"0s"`: close them at once.
    #[serde(default = "d_drain_delay")]
    pub drain_delay: OptDur,
    /// Admin connections open at once; one more is answered 503 and closed.
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// From a request's first byte until its body is read, for writing an answer, and for a
    /// new connection's first byte: a slower client gets 408 (or is cut off while writing, or
    /// closed silently before its first byte) and its connection closes.
    #[serde(default = "d_request_timeout")]
    pub request_timeout: Dur,
    /// A keep-alive connection waiting for its next request is closed after this.
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout: Dur,
}

fn d_true() -> bool {
    true
}
fn d_address() -> Addr {
    Addr {
        text: DEFAULT_ADDRESS.into(),
        addr: DEFAULT_ADDRESS.parse().expect("a literal socket address"),
    }
}
fn d_drain_delay() -> OptDur {
    OptDur(Some(Duration::from_secs(5)))
}
fn d_max_connections() -> usize {
    16
}
fn d_request_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_idle_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            address: d_address(),
            token: None,
            token_env: None,
            drain_delay: d_drain_delay(),
            max_connections: d_max_connections(),
            request_timeout: d_request_timeout(),
            idle_timeout: d_idle_timeout(),
        }
    }
}

impl AdminConfig {
    /// The token, from the file or from the environment variable `token_env` names. `Err`:
    /// the variable is missing or holds a token `check_token` refuses.
    pub fn token(&self) -> Result<Option<Secret>, String> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let Some(var) = &self.token_env else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(v) => {
                check_token(&v)?;
                Ok(Some(Secret(v)))
            }
            Err(std::env::VarError::NotPresent) => {
                Err(format!("environment variable {var:?} is not set"))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("environment variable {var:?} is not UTF-8"))
            }
        }
    }

    /// The drain delay (zero: none).
    pub fn drain_delay(&self) -> Duration {
        self.drain_delay.0.unwrap_or(Duration::ZERO)
    }
}

/// A bearer token must be a `token68` (RFC 6750 §2.1: letters, digits, `-._~+/`, trailing
/// `=`), so that it can be sent as written, and long enough not to be guessed. The reason
/// never quotes the token.
fn check_token(t: &str) -> Result<(), String> {
    if t.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token must be at least {MIN_TOKEN_LEN} characters long"
        ));
    }
    if t.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "the token must be at most {MAX_TOKEN_LEN} characters long"
        ));
    }
    let body = t.trim_end_matches('=');
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
    {
        return Err(
            "the token may hold only letters, digits and -._~+/ (then '=' padding), as RFC 6750 \
             §2.1 allows in a bearer token"
                .into(),
        );
    }
    Ok(())
}

/// Checks the section; errors are (key path, reason) for `Config::validate` to locate.
pub fn validate(a: &AdminConfig) -> Result<(), (String, String)> {
    if a.token.is_some() && a.token_env.is_some() {
        return Err((
            "admin.token_env".into(),
            "set either `token` or `token_env`, not both".into(),
        ));
    }
    if let Some(t) = &a.token {
        check_token(&t.0).map_err(|e| ("admin.token".to_string(), e))?;
    }
    if a.token_env.is_some() && a.enabled {
        a.token().map_err(|e| ("admin.token_env".to_string(), e))?;
    }
    if a.drain_delay() > MAX_DRAIN_DELAY {
        return Err((
            "admin.drain_delay".into(),
            format!("at most {}s", MAX_DRAIN_DELAY.as_secs()),
        ));
    }
    if a.max_connections == 0 || a.max_connections > MAX_ADMIN_CONNECTIONS {
        return Err((
            "admin.max_connections".into(),
            format!("must be 1 to {MAX_ADMIN_CONNECTIONS}"),
        ));
    }
    let ip = a.address.addr.ip();
    let has_token = a.token.is_some() || a.token_env.is_some();
    if a.enabled && !ip.is_loopback() && !has_token {
        return Err((
            "admin.address".into(),
            format!(
                "{} is not a loopback address: an admin API reachable from the network needs \
                 `token` or `token_env` in [admin]",
                a.address.addr
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    fn with_admin(admin: &str) -> Result<Config, ConfigError> {
        let src = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[admin]\n{admin}\n\n[[routes]]\ndirect = {{ status = 200 }}\n"
        );
        Config::parse(&src, "admin.toml")
    }

    #[test]
    fn the_section_is_off_unless_present_and_loopback_by_default() {
        let c = Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\ndirect = { status = 200 }\n",
            "t.toml",
        )
        .unwrap();
        assert!(c.admin.is_none());
        let a = with_admin("").unwrap().admin.unwrap();
        assert!(a.enabled);
        assert_eq!(a.address.addr.to_string(), "127.0.0.1:9901");
        assert_eq!(a.drain_delay(), std::time::Duration::from_secs(5));
        assert_eq!(a.token().unwrap(), None);
    }

    #[test]
    fn a_non_loopback_address_without_a_token_is_refused_with_file_line_and_key() {
        for addr in ["0.0.0.0:9901", "[::]:9901", "10.1.2.3:9901"] {
            let e = with_admin(&format!("address = \"{addr}\"")).unwrap_err();
            assert_eq!(e.key, "admin.address", "{addr}");
            assert_eq!(e.file, "admin.toml");
            assert_eq!(e.line, Some(5), "{addr}: {e}");
            assert!(e.to_string().contains("not a loopback address"), "{e}");
        }
        // With a token it starts; switched off it is not checked.
        let c = with_admin("address = \"0.0.0.0:9901\"\ntoken = \"0123456789abcdef-xyz\"").unwrap();
        assert!(c.admin.unwrap().token().unwrap().is_some());
        with_admin("address = \"0.0.0.0:9901\"\nenabled = false").unwrap();
        with_admin("address = \"[::1]:9901\"").unwrap();
    }

    #[test]
    fn tokens_are_checked_without_quoting_them() {
        let e = with_admin("token = \"short\"").unwrap_err();
        assert_eq!(e.key, "admin.token");
        assert!(!e.to_string().contains("short"), "{e}");
        let e = with_admin("token = \"0123456789abcdef xyz\"").unwrap_err();
        assert_eq!(e.key, "admin.token");
        assert!(!e.to_string().contains("0123456789"), "{e}");
        let e = with_admin("token = \"0123456789abcdef\"\ntoken_env = \"RINGWAY_TEST_NONE\"")
            .unwrap_err();
        assert_eq!(e.key, "admin.token_env");
        let e = with_admin("token_env = \"RINGWAY_ADMIN_TEST_UNSET_VARIABLE\"").unwrap_err();
        assert_eq!(e.key, "admin.token_env");
        assert!(e.to_string().contains("is not set"), "{e}");
        let e = with_admin("max_connections = 0").unwrap_err();
        assert_eq!(e.key, "admin.max_connections");
        let e = with_admin("drain_delay = \"2h\"").unwrap_err();
        assert_eq!(e.key, "admin.drain_delay");
        assert!(with_admin("drain_delay = \"0s\"")
            .unwrap()
            .admin
            .unwrap()
            .drain_delay()
            .is_zero());
    }

    #[test]
    fn a_token_from_the_environment() {
        // A name no other test uses: the environment is shared by the test threads.
        std::env::set_var("RINGWAY_ADMIN_TEST_TOKEN_A", "abcdefghijklmnop1234");
        let c =
            with_admin("address = \"0.0.0.0:9901\"\ntoken_env = \"RINGWAY_ADMIN_TEST_TOKEN_A\"")
                .unwrap();
        assert_eq!(
            c.admin.unwrap().token().unwrap().unwrap().0,
            "abcdefghijklmnop1234"
        );
    }
}
