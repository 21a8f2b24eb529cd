//! The wait-for graph of single flight: which thread waits on which thread.
//!
//! A thread that misses a key another thread is computing waits on that
//! computation's owner. If the owner is itself (directly or through other
//! waiting threads) waiting on the first thread, waiting would deadlock: the
//! graph refuses that edge and the caller computes directly instead (the
//! same-thread re-entrancy rule, generalised to cycles across threads).
//!
//! Invariants: a thread has at most one outgoing edge (it waits on one
//! computation at a time); an edge whose computation is already done is
//! stale and never closes a cycle; the graph never holds a cycle, since the
//! edge that would close one is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One waiting thread: the owner it waits on and that computation's done flag.
struct Edge {
    owner: u64,
    done: Arc<AtomicBool>,
}

/// Threads waiting on other threads' computations, by thread ident.
#[derive(Default)]
pub struct WaitGraph {
    edges: HashMap<u64, Edge>,
}

impl WaitGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record that thread `me` waits on the computation (`done`) owned by
    /// `owner`, unless that closes a cycle: then return `false` and record
    /// nothing (the caller computes directly).
    pub fn try_wait(&mut self, me: u64, owner: u64, done: &Arc<AtomicBool>) -> bool {
        let mut at = owner;
        // Each step follows a distinct edge of an acyclic graph, so the walk
        // ends within `len + 1` steps; the bound is a second safety net.
        for _ in 0..=self.edges.len() {
            if at == me {
                return false;
            }
            match self.edges.get(&at) {
                Some(edge) if !edge.done.load(Ordering::Acquire) => at = edge.owner,
                _ => break,
            }
        }
        self.edges.insert(
            me,
            Edge {
                owner,
                done: done.clone(),
            },
        );
        true
    }

    /// Thread `me` stopped waiting.
    pub fn end_wait(&mut self, me: u64) {
        self.edges.remove(&me);
    }

    /// Forget every edge (the threads that made them are gone, after a fork).
    pub fn clear(&mut self) {
        self.edges.clear();
    }

    /// The number of waiting threads.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Whether no thread waits.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    #[test]
    fn waiting_on_yourself_is_refused() {
        let mut g = WaitGraph::new();
        assert!(!g.try_wait(1, 1, &flag()));
        assert!(g.is_empty());
    }

    #[test]
    fn a_two_thread_cycle_is_refused_to_the_second_waiter() {
        let mut g = WaitGraph::new();
        assert!(g.try_wait(1, 2, &flag()));
        assert!(!g.try_wait(2, 1, &flag()));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn a_longer_cycle_is_found_through_the_chain() {
        let mut g = WaitGraph::new();
        assert!(g.try_wait(1, 2, &flag()));
        assert!(g.try_wait(2, 3, &flag()));
        assert!(!g.try_wait(3, 1, &flag()));
        assert!(g.try_wait(4, 1, &flag()), "a chain without a cycle is fine");
    }

    #[test]
    fn an_edge_to_a_finished_computation_does_not_close_a_cycle() {
        let mut g = WaitGraph::new();
        let done = flag();
        assert!(g.try_wait(1, 2, &done));
        done.store(true, Ordering::Release);
        assert!(g.try_wait(2, 1, &flag()));
    }

    #[test]
    fn ending_a_wait_removes_the_edge() {
        let mut g = WaitGraph::new();
        assert!(g.try_wait(1, 2, &flag()));
        g.end_wait(1);
        assert!(g.try_wait(2, 1, &flag()));
        g.clear();
        assert!(g.is_empty());
    }
}
