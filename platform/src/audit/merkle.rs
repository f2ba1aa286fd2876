//! The tree's pure algorithms, after RFC 9162 §2.1 (the same tree as RFC 6962 §2.1): the root
//! (MTH), inclusion proofs (PATH), consistency proofs (PROOF / SUBPROOF) and their verification
//! (§2.1.3.2 and §2.1.4.2), and the [`Frontier`], the right edge that extends the tree one leaf
//! at a time.
//!
//! **Nodes.** Node `(level, idx)` is the hash of the complete subtree of `2^level` leaves
//! `idx·2^level … (idx+1)·2^level − 1`; level 0 is a leaf. Every range a proof needs is either
//! such a complete subtree or the right edge of a tree, whose hash is that of the complete
//! subtrees of the binary decomposition of its length (largest first, always aligned), folded
//! right to left with [`node_hash`]. So a proof is generated from O(log n) stored nodes: the
//! `*_nodes` functions list them, and the generators read them through a lookup, which keeps
//! everything here free of I/O and testable without a database.

use super::{empty_root, node_hash, Hash};

/// Why a proof cannot be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// The sizes or index asked for do not make a proof (index ≥ size, from > to, from = 0, …).
    #[error("{0}")]
    OutOfRange(String),
    /// The lookup did not have node `(level, idx)`.
    #[error("audit tree node (level {0}, index {1}) is missing")]
    MissingNode(u8, u64),
}

/// The largest power of two strictly below `n` (`n ≥ 2`).
fn split(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The level of the largest complete subtree in a decomposition: `floor(log2(n))`, `n ≥ 1`.
fn log2(n: u64) -> u8 {
    // At most 63: the cast cannot truncate.
    (63 - n.leading_zeros()) as u8
}

/// The nodes whose hashes, folded right to left, give the hash of leaves `start … start+len−1`,
/// when `start` is a multiple of the smallest power of two ≥ `len` (every range the RFC's
/// recursion visits is).
fn range_nodes(start: u64, len: u64, out: &mut Vec<(u8, u64)>) {
    let mut offset = start;
    let mut rest = len;
    while rest > 0 {
        let level = log2(rest);
        out.push((level, offset >> level));
        offset += 1u64 << level;
        rest -= 1u64 << level;
    }
}

/// The hash of leaves `start … start+len−1` (`len ≥ 1`) from `node`.
fn range_hash(start: u64, len: u64, node: &impl Fn(u8, u64) -> Option<Hash>) -> Result<Hash, MerkleError> {
    let mut nodes = Vec::new();
    range_nodes(start, len, &mut nodes);
    let mut acc: Option<Hash> = None;
    for &(level, idx) in nodes.iter().rev() {
        let hash = node(level, idx).ok_or(MerkleError::MissingNode(level, idx))?;
        acc = Some(match acc {
            None => hash,
            Some(right) => node_hash(&hash, &right),
        });
    }
    acc.ok_or_else(|| MerkleError::OutOfRange("an empty range has no hash".to_owned()))
}

/// The nodes that make the root of the tree of `size` leaves (one per 1-bit of `size`, largest
/// first); none for the empty tree.
#[must_use]
pub fn root_nodes(size: u64) -> Vec<(u8, u64)> {
    let mut out = Vec::new();
    range_nodes(0, size, &mut out);
    out
}

/// The root of the tree of `size` leaves from `node`; the empty tree's root for 0.
///
/// # Errors
/// [`MerkleError::MissingNode`] when `node` lacks one of [`root_nodes`].
pub fn root_from(size: u64, node: impl Fn(u8, u64) -> Option<Hash>) -> Result<Hash, MerkleError> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_hash(0, size, &node)
}

/// MTH(D\[n\]): the root over `leaves` (leaf hashes), computed as RFC 9162 §2.1.1 defines it;
/// the empty tree's root for none.
#[must_use]
pub fn root(leaves: &[Hash]) -> Hash {
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            1 => leaves[0],
            n => {
                // usize → u64 → usize: the split is below the length, so it fits.
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }
    if leaves.is_empty() {
        empty_root()
    } else {
        mth(leaves)
    }
}

/// The ranges `(start, len)` whose hashes form the inclusion proof of leaf `index` in the tree
/// of `size` leaves, in the proof's order (nearest the leaf first).
fn inclusion_ranges(index: u64, size: u64) -> Result<Vec<(u64, u64)>, MerkleError> {
    if index >= size {
        return Err(MerkleError::OutOfRange(format!("leaf index {index} is not below tree size {size}")));
    }
    // PATH(m, D[start:start+n]), iteratively from the top; reversed at the end.
    let mut ranges = Vec::new();
    let (mut start, mut n, mut m) = (0u64, size, index);
    while n > 1 {
        let k = split(n);
        if m < k {
            ranges.push((start + k, n - k));
            n = k;
        } else {
            ranges.push((start, k));
            start += k;
            m -= k;
            n -= k;
        }
    }
    ranges.reverse();
    Ok(ranges)
}

/// The nodes an inclusion proof of leaf `index` in the tree of `size` leaves reads.
///
/// # Errors
/// [`MerkleError::OutOfRange`] when `index ≥ size`.
pub fn inclusion_nodes(index: u64, size: u64) -> Result<Vec<(u8, u64)>, MerkleError> {
    let mut out = Vec::new();
    for (start, len) in inclusion_ranges(index, size)? {
        range_nodes(start, len, &mut out);
    }
    Ok(out)
}

/// PATH(index, D\[size\]) (RFC 9162 §2.1.3.1): the inclusion proof of leaf `index` in the tree of
/// `size` leaves, nearest the leaf first, from the nodes `node` returns.
///
/// # Errors
/// [`MerkleError::OutOfRange`] when `index ≥ size`; [`MerkleError::MissingNode`] when `node`
/// lacks one of [`inclusion_nodes`].
pub fn inclusion_proof(
    index: u64,
    size: u64,
    node: impl Fn(u8, u64) -> Option<Hash>,
) -> Result<Vec<Hash>, MerkleError> {
    inclusion_ranges(index, size)?.into_iter().map(|(start, len)| range_hash(start, len, &node)).collect()
}

/// The ranges whose hashes form the consistency proof from size `from` to size `to`.
fn consistency_ranges(from: u64, to: u64) -> Result<Vec<(u64, u64)>, MerkleError> {
    if from == 0 {
        return Err(MerkleError::OutOfRange("a consistency proof starts at a tree size of at least 1".to_owned()));
    }
    if from > to {
        return Err(MerkleError::OutOfRange(format!("from ({from}) is larger than to ({to})")));
    }
    // SUBPROOF(m, D[start:start+n], b), iteratively: the extra hashes are appended after the
    // sub-proof, so they are collected from the top and reversed at the end.
    let mut extras = Vec::new();
    let (mut start, mut n, mut m, mut whole) = (0u64, to, from, true);
    while m != n {
        let k = split(n);
        if m <= k {
            extras.push((start + k, n - k));
            n = k;
        } else {
            extras.push((start, k));
            start += k;
            m -= k;
            n -= k;
            whole = false;
        }
    }
    if !whole {
        extras.push((start, m));
    }
    extras.reverse();
    Ok(extras)
}

/// The nodes a consistency proof from size `from` to size `to` reads.
///
/// # Errors
/// [`MerkleError::OutOfRange`] when `from` is 0 or larger than `to`.
pub fn consistency_nodes(from: u64, to: u64) -> Result<Vec<(u8, u64)>, MerkleError> {
    let mut out = Vec::new();
    for (start, len) in consistency_ranges(from, to)? {
        range_nodes(start, len, &mut out);
    }
    Ok(out)
}

/// PROOF(from, D\[to\]) (RFC 9162 §2.1.4.1): the proof that the tree of `from` leaves is a prefix
/// of the tree of `to` leaves, from the nodes `node` returns. Empty when `from = to`.
///
/// # Errors
/// [`MerkleError::OutOfRange`] when `from` is 0 or larger than `to`;
/// [`MerkleError::MissingNode`] when `node` lacks one of [`consistency_nodes`].
pub fn consistency_proof(from: u64, to: u64, node: impl Fn(u8, u64) -> Option<Hash>) -> Result<Vec<Hash>, MerkleError> {
    consistency_ranges(from, to)?.into_iter().map(|(start, len)| range_hash(start, len, &node)).collect()
}

/// RFC 9162 §2.1.3.2: whether `path` proves that `leaf` is leaf `index` of the tree of `size`
/// leaves whose root is `root`.
#[must_use]
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: whether `proof` proves that the tree of `from` leaves with root
/// `from_root` is a prefix of the tree of `to` leaves with root `to_root`. For `from = to` the
/// proof is empty and the roots equal; `from = 0` is never proven.
#[must_use]
pub fn verify_consistency(from: u64, to: u64, proof: &[Hash], from_root: &Hash, to_root: &Hash) -> bool {
    if from == 0 || from > to {
        return false;
    }
    if from == to {
        return proof.is_empty() && from_root == to_root;
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<&Hash> = Vec::with_capacity(proof.len() + 1);
    if from.is_power_of_two() {
        path.push(from_root);
    }
    path.extend(proof.iter());
    let (mut fnode, mut snode) = (from - 1, to - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*path[0], *path[0]);
    for c in &path[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    fr == *from_root && sr == *to_root && snode == 0
}

/// The right edge of the tree: the hash of each complete subtree of the binary decomposition
/// of its size, largest (leftmost) first. O(log n) hashes extend the tree by one leaf and give
/// its root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    /// The empty tree's edge.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The edge of a tree of `size` leaves from its peaks (one per 1-bit of `size`, largest
    /// first), as stored: node `(level, idx)` for each 1-bit `level`, see [`root_nodes`].
    ///
    /// # Errors
    /// When the number of peaks does not match `size`.
    pub fn from_peaks(size: u64, peaks: Vec<Hash>) -> anyhow::Result<Self> {
        let want = size.count_ones() as usize;
        anyhow::ensure!(peaks.len() == want, "a tree of {size} leaves has {want} peaks, not {}", peaks.len());
        Ok(Self { size, peaks })
    }

    /// How many leaves the tree holds.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peaks, largest subtree first.
    #[must_use]
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Appends leaf hash `leaf` (leaf index [`Frontier::size`] before the call) and returns the
    /// complete subtrees it finished, `(level, idx, hash)` with level ≥ 1, lowest first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(u8, u64, Hash)> {
        let index = self.size;
        let mut finished = Vec::new();
        let mut current = leaf;
        let mut level = 0u8;
        while (index >> level) & 1 == 1 {
            let Some(left) = self.peaks.pop() else { break };
            current = node_hash(&left, &current);
            level += 1;
            finished.push((level, index >> level, current));
        }
        self.peaks.push(current);
        self.size += 1;
        finished
    }

    /// The root of the tree so far (the empty tree's root when it has no leaf).
    #[must_use]
    pub fn root(&self) -> Hash {
        let mut iter = self.peaks.iter().rev();
        let Some(last) = iter.next() else { return empty_root() };
        iter.fold(*last, |acc, peak| node_hash(peak, &acc))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::audit::{leaf_hash, to_hex};

    /// The tree of `n` leaves `leaf_hash([i])` and every node it stores.
    fn build(n: u64) -> (Vec<Hash>, HashMap<(u8, u64), Hash>, Frontier) {
        let mut nodes = HashMap::new();
        let mut frontier = Frontier::new();
        let mut leaves = Vec::new();
        for i in 0..n {
            let leaf = leaf_hash(&i.to_be_bytes());
            leaves.push(leaf);
            nodes.insert((0, i), leaf);
            for (level, idx, hash) in frontier.push(leaf) {
                nodes.insert((level, idx), hash);
            }
        }
        (leaves, nodes, frontier)
    }

    #[test]
    fn rfc_6962_test_vectors() {
        // The eight leaves of the RFC 6962 reference implementation's tests (certificate-
        // transparency merkle_tree_test) and the roots of their prefixes.
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f],
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves: Vec<Hash> = inputs.iter().map(|b| leaf_hash(b)).collect();
        let mut frontier = Frontier::new();
        for (i, leaf) in leaves.iter().enumerate() {
            frontier.push(*leaf);
            assert_eq!(to_hex(&root(&leaves[..=i])), roots[i], "root of {} leaves", i + 1);
            assert_eq!(to_hex(&frontier.root()), roots[i], "frontier root of {} leaves", i + 1);
        }
        assert_eq!(root(&[]), empty_root());

        // Published proofs over the same leaves: leaf 5 of 8, and 3 → 8.
        let nodes: HashMap<(u8, u64), Hash> = {
            let mut nodes = HashMap::new();
            let mut frontier = Frontier::new();
            for (i, leaf) in leaves.iter().enumerate() {
                nodes.insert((0, i as u64), *leaf);
                for (level, idx, hash) in frontier.push(*leaf) {
                    nodes.insert((level, idx), hash);
                }
            }
            nodes
        };
        let node = |level: u8, idx: u64| nodes.get(&(level, idx)).copied();
        let hexes = |proof: Vec<Hash>| proof.iter().map(|h| to_hex(h)).collect::<Vec<_>>();
        assert_eq!(
            inclusion_proof(5, 8, node).map(hexes),
            Ok(vec![
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b".to_owned(),
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0".to_owned(),
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7".to_owned(),
            ])
        );
        assert_eq!(
            consistency_proof(3, 8, node).map(hexes),
            Ok(vec![
                "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7".to_owned(),
                "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7".to_owned(),
                "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125".to_owned(),
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4".to_owned(),
            ])
        );
    }

    #[test]
    fn every_proof_of_small_trees_verifies_and_a_wrong_one_does_not() -> anyhow::Result<()> {
        let (leaves, nodes, frontier) = build(70);
        let node = |level: u8, idx: u64| nodes.get(&(level, idx)).copied();
        assert_eq!(frontier.root(), root(&leaves));
        for size in 1..=70u64 {
            let r = root(&leaves[..size as usize]);
            assert_eq!(root_from(size, node)?, r);
            for index in 0..size {
                let path = inclusion_proof(index, size, node)?;
                let leaf = leaves[index as usize];
                assert!(verify_inclusion(&leaf, index, size, &path, &r), "leaf {index} of {size}");
                assert!(!verify_inclusion(&leaf_hash(b"other"), index, size, &path, &r));
                if size > 1 {
                    assert!(!verify_inclusion(&leaf, (index + 1) % size, size, &path, &r));
                }
                let needed = inclusion_nodes(index, size)?;
                assert!(needed.len() <= 2 * 64);
            }
            for from in 1..=size {
                let proof = consistency_proof(from, size, node)?;
                let old = root(&leaves[..from as usize]);
                assert!(verify_consistency(from, size, &proof, &old, &r), "{from} → {size}");
                assert!(!verify_consistency(from, size, &proof, &leaf_hash(b"x"), &r));
                if from < size {
                    assert!(!verify_consistency(from, size, &proof[..proof.len() - 1], &old, &r));
                }
            }
        }
        assert!(matches!(inclusion_proof(3, 3, node), Err(MerkleError::OutOfRange(_))));
        assert!(matches!(consistency_proof(0, 3, node), Err(MerkleError::OutOfRange(_))));
        assert!(matches!(consistency_proof(4, 3, node), Err(MerkleError::OutOfRange(_))));
        assert!(matches!(inclusion_proof(0, 71, node), Err(MerkleError::MissingNode(..))));
        Ok(())
    }

    #[test]
    fn a_frontier_resumes_from_its_stored_peaks() -> anyhow::Result<()> {
        let (leaves, nodes, frontier) = build(45);
        let peaks = root_nodes(45).iter().map(|k| nodes[k]).collect();
        let mut resumed = Frontier::from_peaks(45, peaks)?;
        assert_eq!(resumed, frontier);
        let next = leaf_hash(b"next");
        let finished = resumed.push(next);
        // Leaf 45 = 0b101101 completes (1, 22) only.
        assert_eq!(finished.iter().map(|&(l, i, _)| (l, i)).collect::<Vec<_>>(), vec![(1, 22)]);
        let mut all = leaves;
        all.push(next);
        assert_eq!(resumed.root(), root(&all));
        assert!(Frontier::from_peaks(45, vec![]).is_err());
        Ok(())
    }
}
