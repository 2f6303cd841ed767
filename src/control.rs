//! The control plane: how threads off the data plane (the admin API, signal handlers, a reload)
//! reach the workers without any lock or atomic on the request path.
//!
//! Each worker has a mailbox. Another thread posts a job (a closure) into it; the worker runs
//! it on its own thread from its 50 ms sync task ([`crate::server::SYNC_INTERVAL`]), between
//! requests, with full access to its [`Worker`]. A job that has an answer sends it back over a
//! channel; [`Control::ask`] posts one job to every worker and gathers their answers with a
//! deadline, so a stuck worker cannot hang the admin thread.
//!
//! The cost on the worker: one relaxed load of the mailbox's `posted` flag per sync tick; the
//! mailbox lock is taken only when a job is waiting.
//!
//! With several workers, each also runs [`Control::serve`]: a task asleep on a doorbell of its
//! own (`crate::doorbell`) that every post rings, so a job runs as soon as it is posted rather
//! than at the next tick. A worker's invalidation (RFC 9111 §4.4) then reaches the others'
//! stores before the client that caused it can send its next request to one of them.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::doorbell::{Doorbell, Ring};
use crate::proxy::Worker;

/// How long [`Control::serve`] sleeps at most before it looks again (it is woken by rings).
const SERVE_WAIT: Duration = Duration::from_secs(3600);

/// Work for one worker, run on the worker's thread.
pub type Job = Box<dyn FnOnce(&Rc<Worker>) + Send>;

/// Most jobs waiting in one mailbox; a poster past it gets `Err` (a worker that stopped
/// draining must not make the admin thread grow memory without bound).
pub const MAX_PENDING_JOBS: usize = 1024;

#[derive(Default)]
struct Mailbox {
    posted: AtomicBool,
    jobs: Mutex<Vec<Job>>,
    /// The worker's doorbell while [`Control::serve`] runs there: a post rings it.
    bell: OnceLock<Arc<Ring>>,
}

/// The mailboxes of every worker of one gateway.
pub struct Control {
    boxes: Vec<Mailbox>,
}

/// Why a job did not reach a worker, or its answer did not come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// The worker's mailbox is full (it stopped draining).
    Full(usize),
    /// These workers did not answer within the deadline.
    NoAnswer(Vec<usize>),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Full(w) => write!(f, "worker {w} has too many control jobs waiting"),
            ControlError::NoAnswer(ws) => write!(f, "workers {ws:?} did not answer in time"),
        }
    }
}

impl Control {
    pub fn new(workers: usize) -> Arc<Control> {
        Arc::new(Control {
            boxes: (0..workers).map(|_| Mailbox::default()).collect(),
        })
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.boxes.len()
    }

    /// Queues `job` for worker `worker`; it runs within one sync interval.
    pub fn post(&self, worker: usize, job: Job) -> Result<(), ControlError> {
        self.post_capped(worker, job, true)
    }

    /// [`Control::post`] even past [`MAX_PENDING_JOBS`]: for a job that must reach its worker,
    /// posted rarely (the cache's Redis layer noting the purge of everything it folds its
    /// kept purges into, once per 64 failed purges at most; see `cache::redis`).
    pub(crate) fn post_every(&self, worker: usize, job: Job) -> Result<(), ControlError> {
        self.post_capped(worker, job, false)
    }

    fn post_capped(&self, worker: usize, job: Job, capped: bool) -> Result<(), ControlError> {
        let Some(b) = self.boxes.get(worker) else {
            return Err(ControlError::NoAnswer(vec![worker]));
        };
        let mut jobs = b.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if capped && jobs.len() >= MAX_PENDING_JOBS {
            return Err(ControlError::Full(worker));
        }
        jobs.push(job);
        b.posted.store(true, Ordering::Release);
        drop(jobs);
        if let Some(r) = b.bell.get() {
            r.ring();
        }
        Ok(())
    }

    /// Runs `f` on every worker and returns the answers in worker order, or names the workers
    /// that did not answer within `limit`.
    pub fn ask<T, F>(&self, limit: Duration, f: F) -> Result<Vec<T>, ControlError>
    where
        T: Send + 'static,
        F: Fn(&Rc<Worker>) -> T + Send + Sync + 'static,
    {
        self.ask_capped(limit, f, true)
    }

    /// The first worker whose mailbox is full, if any.
    pub fn full(&self) -> Option<usize> {
        self.boxes.iter().position(|b| {
            b.jobs.lock().unwrap_or_else(|p| p.into_inner()).len() >= MAX_PENDING_JOBS
        })
    }

    /// [`Control::ask`] whose job reaches every worker even past [`MAX_PENDING_JOBS`]: for
    /// a reload, which must reach all workers or none. It checks [`Control::full`] before it
    /// commits and reloads are serialised, so a mailbox holds at most one such job past the
    /// cap.
    pub(crate) fn ask_every(
        &self,
        limit: Duration,
        f: impl Fn(&Rc<Worker>) -> usize + Send + Sync + 'static,
    ) -> Result<Vec<usize>, ControlError> {
        self.ask_capped(limit, f, false)
    }

    fn ask_capped<T, F>(&self, limit: Duration, f: F, capped: bool) -> Result<Vec<T>, ControlError>
    where
        T: Send + 'static,
        F: Fn(&Rc<Worker>) -> T + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let (tx, rx) = mpsc::channel::<(usize, T)>();
        for i in 0..self.boxes.len() {
            let f = f.clone();
            let tx = tx.clone();
            self.post_capped(
                i,
                Box::new(move |w| {
                    let _ = tx.send((i, f(w)));
                }),
                capped,
            )?;
        }
        drop(tx);
        let mut out: Vec<Option<T>> = (0..self.boxes.len()).map(|_| None).collect();
        let end = Instant::now() + limit;
        let mut got = 0;
        while got < out.len() {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((i, v)) => {
                    if out[i].replace(v).is_none() {
                        got += 1;
                    }
                }
                Err(_) => break,
            }
        }
        if got < out.len() {
            let missing = out
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_none())
                .map(|(i, _)| i)
                .collect();
            return Err(ControlError::NoAnswer(missing));
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Runs worker `w`'s jobs as soon as they are posted (see the module doc); the sync task
    /// still looks at each tick. Returns only when the doorbell cannot be made or `serve`
    /// already runs for this worker.
    pub async fn serve(self: Arc<Self>, w: Rc<Worker>) {
        let Some(b) = self.boxes.get(w.id) else {
            return;
        };
        let bell = Doorbell::default();
        let Some(ring) = bell.ring() else { return };
        if b.bell.set(ring).is_err() {
            return;
        }
        loop {
            let deadline = Instant::now() + SERVE_WAIT;
            if bell
                .wait_until(deadline, || b.posted.load(Ordering::Acquire))
                .await
            {
                self.run_pending(&w);
            }
        }
    }

    /// Runs the jobs waiting for worker `w` (called by the worker's sync task).
    pub fn run_pending(&self, w: &Rc<Worker>) {
        let Some(b) = self.boxes.get(w.id) else {
            return;
        };
        if !b.posted.load(Ordering::Relaxed) {
            return;
        }
        let jobs = {
            let mut jobs = b.jobs.lock().unwrap_or_else(|p| p.into_inner());
            b.posted.store(false, Ordering::Relaxed);
            std::mem::take(&mut *jobs)
        };
        for job in jobs {
            job(w);
        }
    }
}
