//! A radix tree over byte strings, used for path prefixes and (over reversed bytes) for
//! `*.suffix` host wildcards.
//!
//! A lookup walks the tree once along the key, remembering the deepest node that carries ids,
//! then climbs `up` links (each node points at its nearest ancestor with ids), so the ids of
//! every stored string that is a prefix of the key are visited from the longest to the
//! shortest without recursion and without allocating. The cost depends on the key's length,
//! not on the number of strings stored.
//!
//! The frozen tree keeps everything in four flat vectors indexed by `u32` (32 bytes per node
//! plus the label bytes), so a table of 100,000 prefixes is a handful of allocations.

/// No node.
const NONE: u32 = u32::MAX;

/// The frozen, read-only tree.
#[derive(Debug, Default)]
pub struct PrefixTree {
    nodes: Vec<Node>,
    /// Children of each node, contiguous per node and sorted by the first byte of their label.
    edges: Vec<(u8, u32)>,
    labels: Vec<u8>,
    ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    label: u32,
    label_len: u32,
    edges: u32,
    edges_len: u32,
    ids: u32,
    ids_len: u32,
    /// Bytes of key consumed at this node (the length of the stored string ending here).
    depth: u32,
    /// Nearest strict ancestor carrying ids, or `NONE`.
    up: u32,
}

/// Reads a key forwards (paths) or backwards (host names, for suffixes).
pub trait Key {
    fn len(&self) -> usize;
    fn at(&self, i: usize) -> u8;
    /// Does the key hold `label` at `pos`? (`pos + label.len() <= len()` is checked first.)
    fn has_at(&self, pos: usize, label: &[u8]) -> bool;
}

pub struct Forward<'a>(pub &'a [u8]);
pub struct Reverse<'a>(pub &'a [u8]);

impl Key for Forward<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn at(&self, i: usize) -> u8 {
        self.0[i]
    }
    #[inline]
    fn has_at(&self, pos: usize, label: &[u8]) -> bool {
        self.0[pos..].starts_with(label)
    }
}

impl Key for Reverse<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn at(&self, i: usize) -> u8 {
        self.0[self.0.len() - 1 - i]
    }
    #[inline]
    fn has_at(&self, pos: usize, label: &[u8]) -> bool {
        label
            .iter()
            .enumerate()
            .all(|(j, b)| self.0[self.0.len() - 1 - (pos + j)] == *b)
    }
}

impl PrefixTree {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of ids stored.
    pub fn ids_len(&self) -> usize {
        self.ids.len()
    }

    /// Visits the ids of the stored strings that are prefixes of `key`, longest first (ids of
    /// one string in insertion order), and returns the first id `accept` takes. With `strict`,
    /// a stored string as long as the whole key is skipped (a wildcard suffix must be shorter
    /// than the host).
    #[inline]
    pub fn find<K: Key>(
        &self,
        key: &K,
        strict: bool,
        mut accept: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        if self.ids.is_empty() {
            return None;
        }
        let nodes = &self.nodes[..];
        let len = key.len();
        let mut n = 0usize;
        let mut best = if nodes[0].ids_len > 0 { 0 } else { NONE };
        let mut pos = 0usize;
        while pos < len {
            let node = &nodes[n];
            let edges = &self.edges[node.edges as usize..(node.edges + node.edges_len) as usize];
            let b = key.at(pos);
            let Ok(k) = edges.binary_search_by_key(&b, |e| e.0) else {
                break;
            };
            let c = edges[k].1 as usize;
            let child = &nodes[c];
            let label =
                &self.labels[child.label as usize..(child.label + child.label_len) as usize];
            if label.len() > len - pos || !key.has_at(pos, label) {
                break;
            }
            pos += label.len();
            n = c;
            if child.ids_len > 0 {
                best = c as u32;
            }
        }
        if strict && best != NONE && nodes[best as usize].depth as usize >= len {
            best = nodes[best as usize].up;
        }
        while best != NONE {
            let node = &nodes[best as usize];
            for &id in &self.ids[node.ids as usize..(node.ids + node.ids_len) as usize] {
                if accept(id) {
                    return Some(id);
                }
            }
            best = node.up;
        }
        None
    }
}

/// Builds a tree by insertion, then freezes it. Nodes, labels and ids live in three flat
/// vectors (children as sibling lists), so building 100,000 prefixes allocates a handful of
/// times rather than per node: on a heap fragmented by the config parser, per-node
/// allocations made the build several times slower.
#[derive(Debug)]
pub struct TreeBuilder {
    nodes: Vec<BNode>,
    /// Key bytes; labels are ranges of it (a split only moves offsets).
    bytes: Vec<u8>,
    /// (node, id) in insertion order.
    ids: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, Copy)]
struct BNode {
    label: u32,
    label_len: u32,
    first_child: u32,
    next_sibling: u32,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        TreeBuilder {
            nodes: vec![BNode {
                label: 0,
                label_len: 0,
                first_child: NONE,
                next_sibling: NONE,
            }],
            bytes: Vec::new(),
            ids: Vec::new(),
        }
    }
}

/// Offsets and counts are u32: a config holds far less than 4 GiB of prefixes (it is read
/// into memory whole, and each prefix costs many times its length there).
fn small(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl TreeBuilder {
    fn label(&self, n: usize) -> &[u8] {
        let b = self.nodes[n];
        &self.bytes[b.label as usize..(b.label + b.label_len) as usize]
    }

    /// Adds `id` under `key`; ids of one key are kept in insertion order.
    pub fn insert(&mut self, key: &[u8], id: u32) {
        let base = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let mut n = 0usize;
        let mut pos = 0usize;
        loop {
            let Some(&first) = key.get(pos) else {
                self.ids.push((small(n), id));
                return;
            };
            // Children differ in their first byte: at most 256 to scan.
            let mut c = self.nodes[n].first_child;
            while c != NONE && self.label(c as usize)[0] != first {
                c = self.nodes[c as usize].next_sibling;
            }
            if c == NONE {
                self.nodes.push(BNode {
                    label: small(base + pos),
                    label_len: small(key.len() - pos),
                    first_child: NONE,
                    next_sibling: self.nodes[n].first_child,
                });
                let new = small(self.nodes.len() - 1);
                self.nodes[n].first_child = new;
                self.ids.push((new, id));
                return;
            }
            let c = c as usize;
            let common = self
                .label(c)
                .iter()
                .zip(&key[pos..])
                .take_while(|(a, b)| a == b)
                .count();
            if common < self.nodes[c].label_len as usize {
                // Split c: a new node takes c's place and holds the shared part; c keeps the
                // rest as its only child.
                let old = self.nodes[c];
                let mid = small(self.nodes.len());
                self.nodes.push(BNode {
                    label: old.label,
                    label_len: small(common),
                    first_child: small(c),
                    next_sibling: old.next_sibling,
                });
                self.nodes[c].label = old.label + small(common);
                self.nodes[c].label_len = old.label_len - small(common);
                self.nodes[c].next_sibling = NONE;
                // Relink n's child list to point at mid instead of c.
                if self.nodes[n].first_child == small(c) {
                    self.nodes[n].first_child = mid;
                } else {
                    let mut s = self.nodes[n].first_child;
                    while self.nodes[s as usize].next_sibling != small(c) {
                        s = self.nodes[s as usize].next_sibling;
                    }
                    self.nodes[s as usize].next_sibling = mid;
                }
                n = mid as usize;
            } else {
                n = c;
            }
            pos += common;
        }
    }

    /// Lays the tree out flat, in depth-first order.
    pub fn finish(mut self) -> PrefixTree {
        if self.ids.is_empty() {
            return PrefixTree::default();
        }
        // Ids grouped per node, insertion order kept within a node (stable sort).
        self.ids.sort_by_key(|&(n, _)| n);
        let mut id_range = vec![(0u32, 0u32); self.nodes.len()];
        let mut k = 0usize;
        while k < self.ids.len() {
            let n = self.ids[k].0 as usize;
            let start = k;
            while k < self.ids.len() && self.ids[k].0 as usize == n {
                k += 1;
            }
            id_range[n] = (small(start), small(k - start));
        }
        let mut t = PrefixTree {
            nodes: Vec::with_capacity(self.nodes.len()),
            edges: Vec::new(),
            labels: Vec::new(),
            ids: Vec::with_capacity(self.ids.len()),
        };
        let mut parents: Vec<u32> = Vec::with_capacity(self.nodes.len());
        // (builder index, parent's new index, parent's depth, nearest ancestor with ids). An
        // explicit stack: a config may nest prefixes arbitrarily deep.
        let mut stack: Vec<(u32, u32, u32, u32)> = vec![(0, NONE, 0, NONE)];
        while let Some((bi, parent, parent_depth, up)) = stack.pop() {
            let new = small(t.nodes.len());
            let b = self.nodes[bi as usize];
            let depth = parent_depth + b.label_len;
            let (is, il) = id_range[bi as usize];
            t.nodes.push(Node {
                label: small(t.labels.len()),
                label_len: b.label_len,
                edges: 0,
                edges_len: 0,
                ids: small(t.ids.len()),
                ids_len: il,
                depth,
                up,
            });
            t.labels.extend_from_slice(self.label(bi as usize));
            t.ids.extend(
                self.ids[is as usize..(is + il) as usize]
                    .iter()
                    .map(|p| p.1),
            );
            parents.push(parent);
            let next_up = if il == 0 { up } else { new };
            let mut c = b.first_child;
            while c != NONE {
                stack.push((c, new, depth, next_up));
                c = self.nodes[c as usize].next_sibling;
            }
        }
        group_edges(&mut t, &parents);
        t.labels.shrink_to_fit();
        t
    }
}

/// Fills `edges` so that each node's children are contiguous and sorted by first byte.
fn group_edges(t: &mut PrefixTree, parents: &[u32]) {
    let mut counts = vec![0u32; t.nodes.len()];
    for &p in parents.iter().filter(|&&p| p != NONE) {
        counts[p as usize] += 1;
    }
    let mut start = 0u32;
    for (n, &c) in t.nodes.iter_mut().zip(&counts) {
        n.edges = start;
        n.edges_len = c;
        start += c;
    }
    let mut edges = vec![(0u8, 0u32); start as usize];
    let mut fill = vec![0u32; t.nodes.len()];
    for (i, &p) in parents.iter().enumerate() {
        if p == NONE {
            continue;
        }
        let at = (t.nodes[p as usize].edges + fill[p as usize]) as usize;
        edges[at] = (t.labels[t.nodes[i].label as usize], small(i));
        fill[p as usize] += 1;
    }
    for n in &t.nodes {
        edges[n.edges as usize..(n.edges + n.edges_len) as usize].sort_unstable_by_key(|e| e.0);
    }
    t.edges = edges;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(keys: &[&str]) -> PrefixTree {
        let mut b = TreeBuilder::default();
        for (i, k) in keys.iter().enumerate() {
            b.insert(k.as_bytes(), i as u32);
        }
        b.finish()
    }

    fn all(t: &PrefixTree, key: &str) -> Vec<u32> {
        let mut v = Vec::new();
        t.find(&Forward(key.as_bytes()), false, |id| {
            v.push(id);
            false
        });
        v
    }

    #[test]
    fn visits_prefixes_longest_first() {
        let t = tree(&["/a", "/ab", "/abc/", "", "/b", "/ab", "/abd"]);
        assert_eq!(all(&t, "/abc/x"), vec![2, 1, 5, 0, 3]);
        assert_eq!(all(&t, "/ab"), vec![1, 5, 0, 3]);
        assert_eq!(all(&t, "/abd"), vec![6, 1, 5, 0, 3]);
        assert_eq!(all(&t, "/x"), vec![3]);
        assert_eq!(all(&t, ""), vec![3]);
        assert_eq!(all(&t, "/b/c"), vec![4, 3]);
    }

    #[test]
    fn reverse_strict_skips_whole_key() {
        let t = tree(&["moc.elpmaxe.", "moc."]);
        let mut v = Vec::new();
        t.find(&Reverse(b"a.example.com"), true, |id| {
            v.push(id);
            false
        });
        assert_eq!(v, vec![0, 1]);
        v.clear();
        t.find(&Reverse(b".example.com"), true, |id| {
            v.push(id);
            false
        });
        assert_eq!(v, vec![1]);
    }

    #[test]
    fn empty_tree_finds_nothing() {
        assert_eq!(all(&tree(&[]), "/"), Vec::<u32>::new());
    }

    #[test]
    fn matches_naive_on_many_keys() {
        let keys: Vec<String> = (0..300)
            .map(|i| format!("/{}{}", "ab".repeat(i % 5), i % 17))
            .collect();
        let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
        let t = tree(&refs);
        for probe in ["/abab3x", "/ab1", "/ababababab16/", "/0", "/", "/abababab4"] {
            let mut want: Vec<(usize, u32)> = refs
                .iter()
                .enumerate()
                .filter(|(_, k)| probe.starts_with(**k))
                .map(|(i, k)| (k.len(), i as u32))
                .collect();
            want.sort_by_key(|&(l, i)| (std::cmp::Reverse(l), i));
            let want: Vec<u32> = want.into_iter().map(|(_, i)| i).collect();
            assert_eq!(all(&t, probe), want, "{probe}");
        }
    }
}
