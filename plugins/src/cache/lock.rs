//! Request coalescing: at most one request per primary key goes upstream to fill the
//! cache; the others wait for it. The first miss takes the key's lock and becomes the
//! leader; later ones subscribe to the lock and wait (at most until the lock is
//! `lock_timeout` old) for the leader's outcome: stored (look again: a hit), not
//! cacheable (go upstream themselves, all at once), or failed (look again: one of
//! them becomes the next leader). The leader's [`Guard`] reports the outcome, and its
//! `Drop` reports a failure, so a leader that disappears early (upstream error, client
//! gone, a body filter dropped before the end) never leaves waiters hanging. A lock
//! older than `lock_timeout` is taken over by the next miss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What became of a leader's fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still in flight.
    Pending,
    /// The response was stored.
    Stored,
    /// The response may not be stored.
    Uncacheable,
    /// The leader went away without an answer.
    Failed,
}

struct Slot {
    tx: watch::Sender<Outcome>,
    since: Instant,
}

/// The locks of one cache, by primary key.
pub struct Locks {
    map: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
    timeout: Duration,
}

/// The result of [`Locks::acquire`].
pub enum Acquired {
    /// This request fills the cache; report through the guard.
    Leader(Guard),
    /// Another request does: wait for it until the deadline.
    Wait(Waiter),
}

/// A request waiting for a leader.
pub struct Waiter {
    rx: watch::Receiver<Outcome>,
    deadline: Instant,
}

impl Waiter {
    /// The leader's outcome, or `None` when the lock timed out or `give_up` came first.
    pub async fn wait(mut self, give_up: Instant) -> Option<Outcome> {
        let deadline = tokio::time::Instant::from_std(self.deadline.min(give_up));
        match tokio::time::timeout_at(deadline, self.rx.wait_for(|o| *o != Outcome::Pending)).await
        {
            Ok(Ok(o)) => Some(*o),
            // The sender is gone (cannot happen: the guard reports first).
            Ok(Err(_)) => Some(Outcome::Failed),
            Err(_) => None,
        }
    }
}

/// The leader's lock on a key; reports [`Outcome::Failed`] when dropped unreported.
pub struct Guard {
    locks: Arc<Locks>,
    key: Arc<str>,
    slot: Arc<Slot>,
    done: bool,
}

impl Locks {
    /// Locks whose waiters give up after `timeout`.
    pub fn new(timeout: Duration) -> Arc<Locks> {
        Arc::new(Locks {
            map: Mutex::new(HashMap::new()),
            timeout,
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Slot>>> {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Becomes the leader for `key`, or a waiter on the current leader.
    pub fn acquire(self: &Arc<Self>, key: &str) -> Acquired {
        let mut map = self.map();
        let now = Instant::now();
        if let Some(w) = Self::waiter(&map, key, self.timeout, now) {
            return Acquired::Wait(w);
        }
        let key: Arc<str> = Arc::from(key);
        let (tx, _) = watch::channel(Outcome::Pending);
        let slot = Arc::new(Slot { tx, since: now });
        // A lock past its timeout is replaced; its leader's report then only reaches
        // its own (timed-out) waiters.
        map.insert(Arc::clone(&key), Arc::clone(&slot));
        Acquired::Leader(Guard {
            locks: Arc::clone(self),
            key,
            slot,
            done: false,
        })
    }

    /// A waiter on `key`'s current leader, if there is one that has not timed out.
    pub fn wait_on(&self, key: &str) -> Option<Waiter> {
        Self::waiter(&self.map(), key, self.timeout, Instant::now())
    }

    fn waiter(
        map: &HashMap<Arc<str>, Arc<Slot>>,
        key: &str,
        timeout: Duration,
        now: Instant,
    ) -> Option<Waiter> {
        let slot = map.get(key)?;
        let deadline = slot.since + timeout;
        (deadline > now).then(|| Waiter {
            rx: slot.tx.subscribe(),
            deadline,
        })
    }

    /// Keys currently locked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map().len()
    }
}

impl Guard {
    /// Reports the outcome and releases the lock.
    pub fn release(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut map = self.locks.map();
            if map
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
            {
                map.remove(&self.key);
            }
        }
        self.slot.tx.send_replace(outcome);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.finish(Outcome::Failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn waiters_give_up_at_their_own_deadline() {
        let locks = Locks::new(Duration::from_secs(60));
        let Acquired::Leader(_g) = locks.acquire("k") else {
            panic!()
        };
        let w = locks.wait_on("k").unwrap();
        let t = Instant::now();
        assert_eq!(w.wait(t + Duration::from_millis(30)).await, None);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn one_leader_many_waiters() {
        let locks = Locks::new(Duration::from_secs(5));
        let Acquired::Leader(g) = locks.acquire("k") else {
            panic!("first is the leader")
        };
        let mut waiters = Vec::new();
        for _ in 0..10 {
            let Acquired::Wait(w) = locks.acquire("k") else {
                panic!("later ones wait")
            };
            waiters.push(tokio::spawn(w.wait(far())));
        }
        assert!(matches!(locks.acquire("other"), Acquired::Leader(_)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        g.release(Outcome::Stored);
        for w in waiters {
            assert_eq!(w.await.unwrap(), Some(Outcome::Stored));
        }
        assert_eq!(locks.len(), 0);
        assert!(locks.wait_on("k").is_none());
    }

    #[tokio::test]
    async fn dropped_leader_fails_waiters() {
        let locks = Locks::new(Duration::from_secs(5));
        let Acquired::Leader(g) = locks.acquire("k") else {
            panic!()
        };
        let w = locks.wait_on("k").unwrap();
        let t = tokio::spawn(w.wait(far()));
        drop(g);
        assert_eq!(t.await.unwrap(), Some(Outcome::Failed));
        assert!(matches!(locks.acquire("k"), Acquired::Leader(_)));
    }

    #[tokio::test]
    async fn waiters_time_out_and_old_locks_are_taken_over() {
        let locks = Locks::new(Duration::from_millis(50));
        let Acquired::Leader(old) = locks.acquire("k") else {
            panic!()
        };
        let Acquired::Wait(w) = locks.acquire("k") else {
            panic!()
        };
        let t = Instant::now();
        assert_eq!(w.wait(far()).await, None);
        assert!(t.elapsed() >= Duration::from_millis(40));
        let Acquired::Leader(new) = locks.acquire("k") else {
            panic!("a timed-out lock is taken over")
        };
        // The old leader's late report leaves the new lock alone.
        old.release(Outcome::Stored);
        assert_eq!(locks.len(), 1);
        new.release(Outcome::Uncacheable);
        assert_eq!(locks.len(), 0);
    }
}
