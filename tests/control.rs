//! The control plane: jobs posted from another thread run on each worker's own thread.

mod support;

use std::time::Duration;

use support::*;

#[test]
fn ask_runs_a_job_on_every_worker_and_gathers_answers_in_worker_order() {
    for driver in DRIVERS {
        let up = Upstream::echo();
        let toml = config(&[up.addr], "[server]\nworkers = 3\n");
        let gw = TestGateway::start(&toml, driver);
        let ctl = gw.gateway().control().clone();
        assert_eq!(ctl.workers(), 3);
        let me = std::thread::current().id();
        let answers = ctl
            .ask(Duration::from_secs(5), move |w| {
                (w.id, std::thread::current().id() != me)
            })
            .expect("every worker answers");
        assert_eq!(answers, vec![(0, true), (1, true), (2, true)]);
    }
}

#[test]
fn a_stopped_worker_is_named_instead_of_hanging_the_caller() {
    let up = Upstream::echo();
    let mut gw = TestGateway::start(&config(&[up.addr], ""), DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    gw.stop();
    let err = ctl
        .ask(Duration::from_millis(300), |w| w.id)
        .expect_err("no worker runs");
    assert_eq!(err, ringway::control::ControlError::NoAnswer(vec![0]));
}
