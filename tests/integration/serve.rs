//! Serving: routes, health, the ready line, the compile cache, graceful shutdown.

use crate::util::{Project, manifest};

#[test]
fn routes_use_spins_syntax_exact_and_prefix() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n\
         [function.api]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\n",
    ));
    let lepton = project.up();
    let reply = lepton.get("/hello");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "Hello from Lepton\n")
    );
    assert!(reply.header("x-lepton-request-id").is_some());
    // `/hello` is exact; `/probe/...` is `/probe` and everything below it, whole segments.
    assert_eq!(lepton.get("/hello/deeper/path").status, 404);
    assert_eq!(lepton.post("/probe/echo", b"abc").body, "ok: 3 bytes\n");
    assert_eq!(lepton.get("/probex/echo").status, 404);
    assert_eq!(lepton.get("/hellothere").status, 404);
    assert_eq!(lepton.get("/").status, 404);
    let health = lepton.get("/.well-known/lepton/health");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
}

#[test]
fn most_specific_route_wins() {
    let project = Project::new(&manifest(
        "[function.root]\ncomponent = \"{PROBE}\"\nroute = \"/...\"\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up();
    assert_eq!(lepton.get("/hello").body, "Hello from Lepton\n");
    assert_eq!(lepton.post("/probe/echo", b"abc").body, "ok: 3 bytes\n");
}

#[test]
fn concurrent_requests_all_succeed_with_a_small_concurrency_cap() {
    // Two slots, a deep queue: 32 simultaneous requests wait their turn, none fails.
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\nmax_concurrency = 2\nmax_queue = 64\n",
    ));
    let lepton = project.up();
    let handles: Vec<_> = (0..32)
        .map(|_| lepton.get_in_background("/hello"))
        .collect();
    for handle in handles {
        let reply = handle.join().expect("thread");
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "Hello from Lepton\n")
        );
    }
    assert_eq!(lepton.metric("lepton_requests_total", "hello"), 32);
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"trap\"}", "hello"),
        0
    );
}

#[test]
fn second_start_loads_the_compiled_component_from_the_cache() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    {
        let lepton = project.up();
        lepton.wait_for_log("cached=false");
    }
    let lepton = project.up();
    let log = lepton.wait_for_log("loaded in");
    assert!(
        log.contains("cached=true"),
        "second start compiled again:\n{log}"
    );
    assert_eq!(lepton.get("/hello").body, "Hello from Lepton\n");
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    // `spin` never returns, so its request ends at its timeout: the shutdown must wait
    // for that answer (a 504), not cut the connection.
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"1s\"\n",
    ));
    let mut lepton = project.up();
    let in_flight = lepton.get_in_background("/spin");
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 1);
    let status = lepton.signal_and_wait("TERM");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(in_flight.join().expect("thread").status, 504);
    assert_eq!(
        lepton.rest_of_stdout(),
        "",
        "stdout holds only the ready line"
    );
}

#[test]
fn sigint_stops_an_idle_server_with_exit_zero() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let mut lepton = project.up();
    assert_eq!(lepton.get("/hello").status, 200);
    assert!(lepton.signal_and_wait("INT").success());
}

#[test]
fn a_route_next_to_the_host_prefix_is_served_by_its_function() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/.well-known/leptonx\"\n",
    ));
    let lepton = project.up();
    assert_eq!(
        lepton.get("/.well-known/leptonx").body,
        "Hello from Lepton\n"
    );
    assert_eq!(lepton.get("/.well-known/lepton/health").body, "ok\n");
}

#[test]
fn dot_segments_are_refused_not_routed() {
    // `/hello/../trap` would reach `/trap` if it were resolved by a later hop: refused.
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello/...\"\n\
         [function.trap]\ncomponent = \"{TRAP}\"\nroute = \"/trap\"\n",
    ));
    let lepton = project.up();
    for path in ["/hello/../trap", "/hello/%2e%2e/trap", "/hello/./x"] {
        let reply = crate::util::raw_request(
            &lepton.address,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        );
        assert!(reply.starts_with("HTTP/1.1 400"), "{path}: {reply}");
    }
    assert_eq!(lepton.get("/hello/x").status, 200);
}

#[test]
fn sighup_stops_the_node_as_sigterm_does() {
    // A closed terminal must not end the node without its drain and checkpoints.
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let mut lepton = project.up();
    assert_eq!(lepton.get("/hello").status, 200);
    assert!(lepton.signal_and_wait("HUP").success());
    assert!(lepton.log().contains("SIGHUP received"), "{}", lepton.log());
}
