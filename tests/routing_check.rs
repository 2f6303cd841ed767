//! `ringway check` on large route tables (issue 15): a summary instead of a listing beyond
//! 300 routes, the index build time, and every route listed for small tables.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ringway");

fn config_with(n: usize) -> String {
    let mut s = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n",
    );
    for i in 0..n {
        s.push_str(&format!("[[routes]]\nname = \"r{i}\"\n"));
        if i % 4 != 3 {
            s.push_str("upstream = \"u\"\n");
        }
        match i % 4 {
            0 => s.push_str(&format!("path_prefix = \"/p{i}/\"\n")),
            1 => s.push_str(&format!("path = \"/e{i}\"\nhosts = [\"h{i}.test\"]\n")),
            2 => s.push_str(&format!(
                "path_regex = '^/r{i}/[0-9]+$'\nhosts = [\"*.w{i}.test\"]\nmethods = [\"GET\"]\n"
            )),
            _ => s.push_str("direct = { status = 204 }\nheaders = { \"x-a\" = \"1\" }\n"),
        }
    }
    s
}

fn check(n: usize) -> String {
    let dir = std::env::temp_dir().join(format!("ringway-check-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("routes.toml");
    std::fs::write(&file, config_with(n)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&file)
        .env("RINGWAY_LOG", "off")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn large_tables_are_summarised() {
    let out = check(2_000);
    assert!(
        out.contains(
            "routes: 2000 (500 exact paths, 1000 prefixes or any path, 500 regexes; 1000 on any host, 500 exact hosts, 500 wildcard hosts; 500 with methods, 500 with headers; 500 direct)"
        ),
        "{out}"
    );
    assert!(
        out.contains("first 20 routes:\n  r0: any host prefix=/p0/ -> upstream u\n"),
        "{out}"
    );
    assert!(out.contains("  r19: "), "{out}");
    assert!(!out.contains("  r20: "), "{out}");
    assert!(out.contains("  ... and 1980 more\n"), "{out}");
    assert!(out.contains("router: 2000 routes indexed in "), "{out}");
    assert!(out.lines().count() < 40, "{out}");
}

#[test]
fn small_tables_are_listed_in_full() {
    let out = check(300);
    assert!(out.contains("routes:\n  r0: "), "{out}");
    assert!(
        out.contains("  r299: any host any path -> direct 204"),
        "{out}"
    );
    assert!(!out.contains("more\n"), "{out}");
    assert!(out.contains("router: 300 routes indexed in "), "{out}");
}
