//! API keys: the config holds SHA-256 hashes only; a presented key is hashed and compared in
//! constant time with the hashes that share its first eight bytes.
//!
//! The map lookup on the hash's prefix leaks timing about the *hash* of the presented key,
//! never about a stored key: finding a key whose SHA-256 starts like a stored one tells an
//! attacker nothing about the stored key itself.

use std::collections::HashMap;
use std::rc::Rc;

use subtle::ConstantTimeEq;

use super::config::{parse_key_hash, ConsumerConfig};
use super::Consumer;

/// Longest API key looked at.
pub const MAX_KEY_BYTES: usize = 512;

/// Stored hashes sharing their first eight bytes, each with its consumer.
type Bucket = Vec<([u8; 32], Rc<Consumer>)>;

/// A worker's API key table.
#[derive(Default)]
pub struct KeyTable {
    by_prefix: HashMap<u64, Bucket>,
}

/// SHA-256 of a key, as stored in the config.
pub fn key_hash(key: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The "sha256:<hex>" form of a key, for writing configs (`ringway hash-key`).
pub fn key_hash_hex(key: &[u8]) -> String {
    let mut s = String::from("sha256:");
    for b in key_hash(key) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn prefix(h: &[u8; 32]) -> u64 {
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

impl KeyTable {
    /// `consumers[i]` is the compiled form of `cfg[i]` (hashes validated at load).
    pub fn new(cfg: &[ConsumerConfig], consumers: &[Rc<Consumer>]) -> KeyTable {
        let mut by_prefix: HashMap<u64, Bucket> = HashMap::new();
        for (cc, c) in cfg.iter().zip(consumers) {
            for k in &cc.api_keys {
                let h = parse_key_hash(k).expect("validated at load");
                by_prefix
                    .entry(prefix(&h))
                    .or_default()
                    .push((h, c.clone()));
            }
        }
        KeyTable { by_prefix }
    }

    /// The consumer holding `key`.
    pub fn find(&self, key: &[u8]) -> Option<Rc<Consumer>> {
        if key.len() > MAX_KEY_BYTES {
            return None;
        }
        let h = key_hash(key);
        let list = self.by_prefix.get(&prefix(&h))?;
        let mut found = None;
        // Every candidate is compared, in constant time each.
        for (stored, c) in list {
            if bool::from(stored.ct_eq(&h)) {
                found = Some(c.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_hash_only() {
        let cfg: Vec<ConsumerConfig> = vec![
            toml::from_str(&format!(
                "name = \"a\"\napi_keys = [\"{}\"]",
                key_hash_hex(b"key-a")
            ))
            .unwrap(),
            toml::from_str(&format!(
                "name = \"b\"\napi_keys = [\"{}\", \"{}\"]",
                key_hash_hex(b"key-b1"),
                key_hash_hex(b"key-b2")
            ))
            .unwrap(),
        ];
        let consumers: Vec<Rc<Consumer>> = cfg
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Rc::new(Consumer {
                    index: i as u32,
                    name: c.name.as_str().into(),
                    metadata: Default::default(),
                    scopes: Box::new([]),
                })
            })
            .collect();
        let t = KeyTable::new(&cfg, &consumers);
        assert_eq!(&*t.find(b"key-a").unwrap().name, "a");
        assert_eq!(t.find(b"key-b2").unwrap().index, 1);
        assert!(t.find(b"key-c").is_none());
        assert!(t.find(key_hash_hex(b"key-a").as_bytes()).is_none());
        // The RFC 6234 test vector for "abc".
        assert_eq!(
            key_hash_hex(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
