//! The `ringway` command: run, check, demo.

use std::path::PathBuf;
use std::process::ExitCode;

use ringway::config::Config;
use ringway::server::Gateway;
use ringway::{error, info, warn};

const USAGE: &str = "\
ringway — a thread-per-core API gateway

USAGE:
    ringway [run] [-c FILE] [--workers N]   run the gateway (default config: config/ringway.toml)
    ringway run -c FILE --takeover SOCKET   run, first taking over the listening sockets of the
                                            process serving on the Unix socket SOCKET
    ringway upgrade [-c FILE]               the same, with SOCKET from [server] upgrade_socket:
                                            start the new binary this way; the old one drains
    ringway check [-c FILE]                 validate a config and print a summary
    ringway demo [--workers N]              run config/demo.toml with built-in sample services
    ringway status [--admin ADDR] [--token T]
                                            readiness and upstream health from a running
                                            gateway's admin API (exit 1 when not ready)
    ringway drain [--admin ADDR] [--token T] [--delay D]
                                            fail readiness, then stop accepting after D
                                            (default: [admin] drain_delay)
    ringway reload [--admin ADDR] [--token T]
                                            ask a running gateway to re-read its config file
                                            (as SIGHUP does); prints the refusal when invalid
    ringway hash-key < key.txt              print the \"sha256:...\" form of an API key read from
                                            stdin, for [[consumers]] api_keys
    ringway --version | --help

ENVIRONMENT:
    RINGWAY_DRIVER=auto|io_uring|epoll      override [server].driver
    RINGWAY_LOG=debug|info|warn|error|off   log level (default info)
    RINGWAY_ADMIN_TOKEN=T                   status/drain: the admin token when --token is absent
                                            (status/drain read --admin and the token from
                                            [admin] of -c FILE when it has one; default
                                            127.0.0.1:9901)

SIGNALS:
    SIGHUP                                  reload the config file (refused, with the check
                                            message, when invalid)
    SIGUSR1                                 reopen the access log files (log rotation)
    SIGTERM, SIGINT                         graceful shutdown
";

/// The demo config, built in so that `ringway demo` works from any directory.
const DEMO_TOML: &str = include_str!("../config/demo.toml");

struct Args {
    command: String,
    config: PathBuf,
    workers: Option<usize>,
    /// Whether `-c` was given (status/drain read the admin address from it).
    config_given: bool,
    admin: Option<String>,
    token: Option<String>,
    delay: Option<String>,
    takeover: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        command: "run".into(),
        config: PathBuf::from("config/ringway.toml"),
        workers: None,
        config_given: false,
        admin: None,
        token: None,
        delay: None,
        takeover: None,
    };
    let mut first = true;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "run" | "check" | "demo" | "hash-key" | "status" | "drain" | "reload" | "upgrade"
                if first =>
            {
                a.command = arg
            }
            "--takeover" => {
                a.takeover = Some(it.next().ok_or("--takeover needs a socket path")?.into());
            }
            "-c" | "--config" => {
                a.config = it.next().ok_or("-c needs a file")?.into();
                a.config_given = true;
            }
            "--admin" => a.admin = Some(it.next().ok_or("--admin needs host:port")?),
            "--token" => a.token = Some(it.next().ok_or("--token needs a token")?),
            "--delay" => a.delay = Some(it.next().ok_or("--delay needs a duration")?),
            "-w" | "--workers" => {
                let v = it.next().ok_or("--workers needs a number")?;
                a.workers = Some(
                    v.parse()
                        .map_err(|_| format!("--workers: {v:?} is not a number"))?,
                );
            }
            "-V" | "--version" => a.command = "version".into(),
            "-h" | "--help" => a.command = "help".into(),
            other => return Err(format!("unknown argument {other:?}")),
        }
        first = false;
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ringway: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match args.command.as_str() {
        "help" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        "version" => {
            println!("ringway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "hash-key" => {
            // Read from stdin, not argv: keys stay out of shell history and `ps`.
            let mut key = String::new();
            if std::io::Read::read_to_string(&mut std::io::stdin(), &mut key).is_err() {
                eprintln!("ringway: hash-key reads the key (UTF-8) from stdin");
                return ExitCode::from(2);
            }
            let key = key.trim_end_matches(['\r', '\n']);
            if key.is_empty() {
                eprintln!("ringway: hash-key: empty key");
                return ExitCode::from(2);
            }
            println!("{}", ringway::auth::apikey::key_hash_hex(key.as_bytes()));
            ExitCode::SUCCESS
        }
        "status" | "drain" | "reload" => admin_command(&args),
        "check" => match Config::load(&args.config) {
            Ok(cfg) => {
                print_summary(&args.config.display().to_string(), &cfg);
                // Advice, not errors: the config is valid and the exit status says so.
                for w in cfg.warnings() {
                    eprintln!("ringway: warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ringway: invalid config: {e}");
                ExitCode::from(1)
            }
        },
        "demo" => {
            let demo_path = PathBuf::from("config/demo.toml");
            let cfg = if demo_path.exists() {
                Config::load(&demo_path)
            } else {
                Config::parse(DEMO_TOML, "config/demo.toml (built in)")
            };
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ringway: invalid config: {e}");
                    return ExitCode::from(1);
                }
            };
            if let Err(e) = ringway::demo::start_sample_services() {
                eprintln!("ringway: cannot start the sample services: {e}");
                return ExitCode::from(1);
            }
            let addr = cfg.listeners[0].address.addr;
            println!(
                "ringway demo: sample services on 127.0.0.1:9101-9103, gateway on http://{addr}"
            );
            println!("try:");
            println!("  curl -i http://{addr}/healthz");
            println!("  curl -i http://{addr}/api/users          # round robin over two instances");
            println!("  curl -i http://{addr}/api/users/2");
            println!("  curl -i http://{addr}/api/orders");
            println!("  curl -i -X POST -d '{{\"item\":\"tea\",\"quantity\":2}}' http://{addr}/api/orders");
            println!("  curl -i http://{addr}/nowhere            # 404 from the gateway, with a request id");
            println!("  curl -s http://{addr}/api/users/1/with-orders  # composed: a user, then their orders");
            println!("  curl -s http://{addr}/api/orders-with-users    # composed: orders, each joined with its user");
            println!(
                "  curl -si http://{addr}/cached/users/1 http://{addr}/cached/users/1 | grep -i -e cache-status -e '^age'"
            );
            println!("                                           # cached (one store per worker): a miss, then a hit");
            println!(
                "  curl -si -H 'Range: bytes=0-9' http://{addr}/cached/users/2 http://{addr}/cached/users/2 | grep -i -e cache-status -e content-range"
            );
            println!("                                           # the origin's 206 stored as a piece, then ranges inside it are hits");
            println!(
                "  curl -i -X PURGE -H 'x-api-key: demo-ops-key' http://{addr}/cached/users/1"
            );
            println!("                                           # purged on every worker (the ops key only)");
            println!(
                "  curl -i -X TRACE http://{addr}/api/users # 405: TRACE is refused by default"
            );
            print!("{}", ringway::demo::admin_hints(&cfg));
            println!("stop with Ctrl-C");
            let path = demo_path.exists().then_some(demo_path);
            run(cfg, args.workers, path, None)
        }
        "upgrade" => match Config::load(&args.config) {
            Ok(cfg) => match cfg.server.upgrade_socket.clone() {
                Some(sock) => run(cfg, args.workers, Some(args.config), Some(sock.into())),
                None => {
                    eprintln!(
                        "ringway: upgrade: {} sets no [server] upgrade_socket",
                        args.config.display()
                    );
                    ExitCode::from(2)
                }
            },
            Err(e) => {
                eprintln!("ringway: invalid config: {e}");
                ExitCode::from(1)
            }
        },
        _ => match Config::load(&args.config) {
            Ok(cfg) => run(cfg, args.workers, Some(args.config), args.takeover),
            Err(e) => {
                eprintln!("ringway: invalid config: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// `ringway status` and `ringway drain`: talk to a running gateway's admin API.
fn admin_command(args: &Args) -> ExitCode {
    // The address and token: the flags, else the config's [admin] (the default config file is
    // read only when it exists), else loopback:9901 and RINGWAY_ADMIN_TOKEN.
    let cfg_admin = if args.config_given || args.config.exists() {
        match Config::load(&args.config) {
            Ok(c) => c.admin,
            Err(e) if args.config_given => {
                eprintln!("ringway: invalid config: {e}");
                return ExitCode::from(2);
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let addr = match &args.admin {
        Some(a) => match std::net::ToSocketAddrs::to_socket_addrs(a.as_str())
            .ok()
            .and_then(|mut it| it.next())
        {
            Some(addr) => addr,
            None => {
                eprintln!("ringway: --admin {a:?}: expected host:port");
                return ExitCode::from(2);
            }
        },
        None => {
            let mut addr = cfg_admin.as_ref().map_or_else(
                || {
                    ringway::admin::config::DEFAULT_ADDRESS
                        .parse()
                        .expect("a literal socket address")
                },
                |a| a.address.addr,
            );
            // A wildcard listen address is reached on loopback.
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            addr
        }
    };
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("RINGWAY_ADMIN_TOKEN").ok())
        .or_else(|| {
            cfg_admin
                .as_ref()
                .and_then(|a| a.token().ok().flatten())
                .map(|s| s.0)
        });
    let token = token.as_deref();
    let result = if args.command == "drain" {
        ringway::admin::client::drain(addr, token, args.delay.as_deref()).map(|t| (t, true))
    } else if args.command == "reload" {
        ringway::admin::client::reload(addr, token).map(|t| (t, true))
    } else {
        ringway::admin::client::status(addr, token)
    };
    match result {
        Ok((text, ok)) => {
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(text.as_bytes());
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ringway {}: {e}", args.command);
            ExitCode::from(2)
        }
    }
}

/// Runs the gateway until SIGTERM/SIGINT or a completed hand-over to a new process; SIGHUP
/// reloads `path`. With `takeover`, first adopts the listening sockets of the process serving
/// hand-overs there.
fn run(
    cfg: Config,
    workers: Option<usize>,
    path: Option<PathBuf>,
    takeover: Option<PathBuf>,
) -> ExitCode {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    ringway::log::init(&cfg.log);
    for w in cfg.warnings() {
        warn!("{w}");
    }
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
    {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let names: Vec<String> = cfg
        .listeners
        .iter()
        .map(|l| l.name.clone().unwrap_or_default())
        .collect();
    let upgrade_socket = cfg.server.upgrade_socket.clone();
    let (inherited, handover) = match &takeover {
        Some(sock) => match ringway::upgrade::take_over(sock) {
            Ok((i, t)) => {
                info!("takeover: received {} listening sockets", i.len());
                (i, Some(t))
            }
            Err(e) => {
                error!("takeover: {e}");
                return ExitCode::from(1);
            }
        },
        None => Default::default(),
    };
    // Dropping `handover` on a failed start tells the old process to go on serving.
    let gw = match Gateway::start_with(cfg, workers, inherited) {
        Ok(g) => g,
        Err(e) => {
            error!("cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    for (addr, name) in gw.addrs().iter().zip(names) {
        info!("listening on {addr} {name}");
    }
    if let Some(t) = handover {
        match t.ready() {
            Ok(()) => info!("takeover: the old process stops accepting and drains"),
            Err(e) => warn!("takeover: cannot confirm to the old process: {e}"),
        }
    }
    if let Some(p) = path {
        gw.set_config_path(p);
    }
    if let Some(sock) = upgrade_socket {
        let handle = signals.handle();
        let closed = Box::new(move || handle.close());
        if let Err(e) = ringway::upgrade::listen(&gw, std::path::Path::new(&sock), closed) {
            warn!("upgrade socket {sock}: {e}; binary upgrades are off");
        }
    }
    for sig in signals.forever() {
        if sig == SIGHUP {
            // Logged by the reload itself, success or refusal.
            let _ = gw.reload_config_file();
            continue;
        }
        if sig == SIGUSR1 {
            // Log rotation: the access log files are reopened before their next write.
            info!("signal {sig}: reopening the access log files");
            gw.reopen_access_logs();
            continue;
        }
        info!("signal {sig}: shutting down gracefully");
        break;
    }
    gw.shutdown();
    gw.join();
    info!("stopped");
    ExitCode::SUCCESS
}

/// Beyond this many routes `check` prints counts and the first routes instead of all of them.
const CHECK_LIST_ROUTES: usize = 300;
/// Routes listed when the table is summarised.
const CHECK_SHOWN_ROUTES: usize = 20;

/// Writes the `check` summary; a closed stdout (`| head`) is not an error worth a panic.
fn print_summary(file: &str, cfg: &Config) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{file}: OK");
    let _ = writeln!(out, "workers: {}", cfg.worker_count());
    let _ = writeln!(out, "listeners:");
    for l in &cfg.listeners {
        let mode = match (&l.tls, &l.redirect_https) {
            (Some(t), _) => format!(
                " [tls: {} certificate(s){}]",
                t.certificates.len(),
                match &t.client_auth {
                    Some(c) => format!(", client certificates {:?}", c.mode).to_lowercase(),
                    None => String::new(),
                }
            ),
            (None, Some(_)) => " [redirects to https]".to_string(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "  {} {}{mode}",
            l.address.addr,
            l.name.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(out, "upstreams:");
    for (name, u) in &cfg.upstreams {
        let eps: Vec<String> = u
            .endpoints
            .iter()
            .map(|e| format!("{}={} (w{})", e.address.text, e.address.addr, e.weight))
            .collect();
        let _ = writeln!(out, "  {name} [{:?}]: {}", u.balance, eps.join(", "));
    }
    let t0 = std::time::Instant::now();
    let table = ringway::router::RouteTable::new(cfg);
    let built = t0.elapsed();
    let st = table.stats();
    if cfg.routes.len() > CHECK_LIST_ROUTES {
        // A listing of thousands of lines helps nobody: counts, then the first few routes.
        let with_methods = cfg.routes.iter().filter(|r| !r.methods.is_empty()).count();
        let with_headers = cfg.routes.iter().filter(|r| !r.headers.is_empty()).count();
        let direct = cfg.routes.iter().filter(|r| r.direct.is_some()).count();
        let any_host = cfg.routes.iter().filter(|r| r.hosts.is_empty()).count();
        let _ = writeln!(
            out,
            "routes: {} ({} exact paths, {} prefixes or any path, {} regexes; {} on any host, {} exact hosts, {} wildcard hosts; {} with methods, {} with headers; {} direct)",
            cfg.routes.len(),
            st.exact_paths,
            st.prefixes,
            st.regexes,
            any_host,
            st.exact_hosts,
            st.wildcard_hosts,
            with_methods,
            with_headers,
            direct,
        );
        let _ = writeln!(out, "first {CHECK_SHOWN_ROUTES} routes:");
    } else {
        let _ = writeln!(out, "routes:");
    }
    let shown = if cfg.routes.len() > CHECK_LIST_ROUTES {
        CHECK_SHOWN_ROUTES
    } else {
        cfg.routes.len()
    };
    for (i, r) in cfg.routes.iter().enumerate().take(shown) {
        let path = r
            .path
            .as_ref()
            .map(|p| format!("path={p}"))
            .or(r.path_prefix.as_ref().map(|p| format!("prefix={p}")))
            .or(r.path_regex.as_ref().map(|p| format!("regex={p}")))
            .unwrap_or_else(|| "any path".into());
        let target = match (&r.upstream, &r.direct) {
            (Some(u), _) => format!("-> upstream {}", u.get_ref()),
            (_, Some(d)) => format!("-> direct {}", d.status),
            _ => r.compose.as_ref().map_or(String::new(), |c| {
                let ids: Vec<&str> = c.calls.iter().map(|c| c.id.get_ref().as_str()).collect();
                format!("-> compose {}", ids.join(","))
            }),
        };
        let hosts = if r.hosts.is_empty() {
            "any host".to_string()
        } else {
            r.hosts.join(",")
        };
        let name = r.name.clone().unwrap_or_else(|| format!("route#{i}"));
        let methods = if r.methods.is_empty() {
            String::new()
        } else {
            format!(" methods={}", r.methods.join(","))
        };
        let auth = match &r.auth {
            Some(a) if !a.any_of.is_empty() => format!(" auth={}", a.any_of.join("|")),
            _ => String::new(),
        };
        let _ = writeln!(out, "  {name}: {hosts} {path}{methods} {target}{auth}");
    }
    if shown < cfg.routes.len() {
        let _ = writeln!(out, "  ... and {} more", cfg.routes.len() - shown);
    }
    let _ = writeln!(
        out,
        "router: {} routes indexed in {:.1} ms ({} regex sets)",
        st.routes,
        built.as_secs_f64() * 1e3,
        st.regex_sets
    );
    if !cfg.auth.jwt.is_empty() || !cfg.auth.introspection.is_empty() || !cfg.consumers.is_empty() {
        // Names and key sources only: never a secret.
        let _ = writeln!(out, "auth:");
        for (name, j) in &cfg.auth.jwt {
            let source = if j.secret.is_some() || j.secret_base64.is_some() {
                "inline secret".to_string()
            } else if let Some(f) = &j.public_key_file {
                format!("PEM {f}")
            } else if let Some(f) = &j.jwks_file {
                format!("JWKS file {f}")
            } else {
                format!("JWKS URL {}", j.jwks_url.as_deref().unwrap_or(""))
            };
            let _ = writeln!(out, "  jwt {name}: {source}");
        }
        for (name, i) in &cfg.auth.introspection {
            let _ = writeln!(out, "  introspection {name}: {}", i.url);
        }
        let _ = writeln!(out, "  consumers: {}", cfg.consumers.len());
    }
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(out.as_bytes());
}
