//! Balancing policies. Everything a policy needs (the smooth weighted order, the hash
//! ring) is built when the upstream is compiled; a pick is a few atomic operations and
//! skips endpoints that are unhealthy or ejected, and endpoints already tried by this
//! request (for the retry after a failed connect).

use super::Endpoint;
use crate::config::model::Balance;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What a consistent hash is computed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(String),
    ClientIp,
    Path,
    Query(String),
}

impl HashOn {
    /// Parses a validated `hash_on` value.
    pub fn parse(s: &str) -> HashOn {
        match s.split_once(':') {
            Some(("header", n)) => http::HeaderName::from_bytes(n.as_bytes())
                .map(HashOn::Header)
                .unwrap_or(HashOn::ClientIp),
            Some(("cookie", n)) => HashOn::Cookie(n.to_string()),
            Some(("query", n)) => HashOn::Query(n.to_string()),
            _ if s == "path" => HashOn::Path,
            _ => HashOn::ClientIp,
        }
    }
}

/// A compiled balancer over an upstream's endpoints (indices into that list).
pub struct Balancer {
    kind: Balance,
    /// Smooth weighted round-robin order (nginx's algorithm, unrolled at compile time).
    order: Vec<usize>,
    next: AtomicUsize,
    ring: Vec<(u64, usize)>,
    pub hash_on: HashOn,
    n: usize,
}

/// 64-bit FNV-1a followed by a finalizer: stable across runs and builds.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // murmur3 fmix64 to spread the bits
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
    h ^ (h >> 33)
}

const RING_POINTS_PER_WEIGHT: usize = 160;

impl Balancer {
    /// Prepares a balancer for `eps`.
    pub fn new(kind: Balance, eps: &[Arc<Endpoint>], hash_on: HashOn) -> Balancer {
        let weights: Vec<u64> = eps.iter().map(|e| e.weight.max(1) as u64).collect();
        let order = if kind == Balance::Weighted {
            smooth_order(&weights)
        } else {
            (0..eps.len()).collect()
        };
        let ring = if kind == Balance::ConsistentHash {
            let mut ring = Vec::new();
            for (i, e) in eps.iter().enumerate() {
                let points = RING_POINTS_PER_WEIGHT * e.weight.clamp(1, 100) as usize;
                for p in 0..points {
                    ring.push((hash64(format!("{}-{p}", e.label).as_bytes()), i));
                }
            }
            ring.sort_unstable();
            ring
        } else {
            vec![]
        };
        Balancer {
            kind,
            order,
            next: AtomicUsize::new(0),
            ring,
            hash_on,
            n: eps.len(),
        }
    }

    /// Whether picks need a hash key from the request.
    pub fn needs_key(&self) -> bool {
        self.kind == Balance::ConsistentHash
    }

    /// Picks an available endpoint not in `tried`; `key` is the hash input for
    /// consistent hashing.
    pub fn pick(
        &self,
        eps: &[Arc<Endpoint>],
        key: Option<&[u8]>,
        tried: &[usize],
        cb: Option<&crate::config::model::CircuitBreaker>,
    ) -> Option<usize> {
        if self.n == 0 || eps.len() != self.n {
            return None;
        }
        let ok = |i: usize| !tried.contains(&i) && eps[i].admits(cb);
        match self.kind {
            Balance::RoundRobin | Balance::Weighted => {
                let len = self.order.len();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|k| self.order[(start + k) % len])
                    .find(|&i| ok(i))
            }
            Balance::Random => {
                let start = fastrand(self.n);
                (0..self.n).map(|k| (start + k) % self.n).find(|&i| ok(i))
            }
            Balance::LeastRequest => {
                // Power of two choices on in-flight counts.
                let a = fastrand(self.n);
                let b = (a + 1 + fastrand(self.n.max(2) - 1)) % self.n;
                let cand: Vec<usize> = [a, b].into_iter().filter(|&i| ok(i)).collect();
                match cand.as_slice() {
                    [x, y] if x != y => {
                        let lx = eps[*x].inflight.load(Ordering::Relaxed);
                        let ly = eps[*y].inflight.load(Ordering::Relaxed);
                        Some(if ly < lx { *y } else { *x })
                    }
                    [x, ..] => Some(*x),
                    [] => {
                        // both unavailable: scan for the least loaded available one
                        (0..self.n)
                            .filter(|&i| ok(i))
                            .min_by_key(|&i| eps[i].inflight.load(Ordering::Relaxed))
                    }
                }
            }
            Balance::ConsistentHash => {
                let h = hash64(key.unwrap_or(b""));
                let start = self.ring.partition_point(|(p, _)| *p < h);
                let len = self.ring.len();
                (0..len)
                    .map(|k| self.ring[(start + k) % len].1)
                    .find(|&i| ok(i))
            }
        }
    }
}

/// nginx's smooth weighted round robin, unrolled into one period.
fn smooth_order(weights: &[u64]) -> Vec<usize> {
    if weights.is_empty() {
        return vec![];
    }
    // Keep one period short: divide by the gcd, cap the total.
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let total: u64 = w.iter().sum();
    if total > 10_000 {
        let scale = total as f64 / 10_000.0;
        w = w
            .iter()
            .map(|x| ((*x as f64 / scale).round() as u64).max(1))
            .collect();
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A cheap thread-local xorshift in `0..n`.
pub fn fastrand(n: usize) -> usize {
    use std::cell::Cell;
    thread_local! {
        static S: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    if n <= 1 {
        return 0;
    }
    S.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x % n as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let label = format!("127.0.0.1:{}", 9000 + i);
                Arc::new(Endpoint::new(
                    label.parse::<SocketAddr>().unwrap(),
                    &label,
                    1,
                ))
            })
            .collect()
    }

    #[test]
    fn smooth_weights() {
        assert_eq!(smooth_order(&[3, 1]), vec![0, 0, 1, 0]);
        assert_eq!(smooth_order(&[5, 1, 1]).len(), 7);
    }

    #[test]
    fn ring_moves_only_removed_keys() {
        let three = eps(3);
        let b3 = Balancer::new(Balance::ConsistentHash, &three, HashOn::ClientIp);
        let two: Vec<_> = vec![three[0].clone(), three[2].clone()];
        let b2 = Balancer::new(Balance::ConsistentHash, &two, HashOn::ClientIp);
        for k in 0..2000 {
            let key = format!("user-{k}");
            let a = b3.pick(&three, Some(key.as_bytes()), &[], None).unwrap();
            let b = b2.pick(&two, Some(key.as_bytes()), &[], None).unwrap();
            if a != 1 {
                assert_eq!(three[a].label, two[b].label, "key {key} moved");
            }
        }
    }

    #[test]
    fn skips_unavailable() {
        let e = eps(3);
        e[1].healthy.store(false, Ordering::Relaxed);
        let b = Balancer::new(Balance::RoundRobin, &e, HashOn::ClientIp);
        for _ in 0..10 {
            assert_ne!(b.pick(&e, None, &[], None), Some(1));
        }
        assert_eq!(b.pick(&e, None, &[0, 2], None), None);
    }
}
