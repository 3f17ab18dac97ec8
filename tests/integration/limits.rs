//! Limits and errors: the server keeps serving through all of them.

use std::time::{Duration, Instant};

use crate::util::{Project, manifest};

#[test]
fn a_trapping_guest_gets_500_with_a_request_id_and_the_server_keeps_serving() {
    let project = Project::new(&manifest(
        "[function.trap]\ncomponent = \"{TRAP}\"\nroute = \"/trap\"\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up();
    for _ in 0..3 {
        let reply = lepton.get("/trap");
        assert_eq!(reply.status, 500);
        let request_id = reply
            .header("x-lepton-request-id")
            .expect("request id")
            .to_owned();
        assert!(
            reply.body.contains(&request_id),
            "body names the request id: {reply:?}"
        );
        assert!(
            !reply.body.contains("secret-detail"),
            "guest internals leaked: {reply:?}"
        );
        let log = lepton.wait_for_log(&format!("request_id={request_id}"));
        assert!(
            log.contains("secret-detail-42"),
            "the panic is in the host log"
        );
    }
    assert_eq!(lepton.get("/hello").status, 200);
}

#[test]
fn a_guest_past_its_timeout_gets_504_promptly() {
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"1s\"\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up();
    // A spinning guest must not starve other requests while it runs.
    let url = lepton.url("/spin");
    let spinning = std::thread::spawn(move || {
        let started = Instant::now();
        (
            crate::util::reply(ureq::get(&url).call()),
            started.elapsed(),
        )
    });
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 1);
    assert_eq!(lepton.get("/hello").status, 200);
    let (reply, elapsed) = spinning.join().expect("thread");
    assert_eq!(reply.status, 504, "{reply:?}");
    assert!(
        elapsed >= Duration::from_secs(1),
        "answered early: {elapsed:?}"
    );
    // The server answers within 100 ms of the deadline (one epoch tick, 10 ms, plus
    // scheduling); the margin here also covers the client on a busy CI machine.
    assert!(
        elapsed < Duration::from_millis(1200),
        "answered late: {elapsed:?}"
    );
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"timeout\"}", "spin"),
        1
    );
    assert_eq!(lepton.get("/hello").status, 200);
}

#[test]
fn memory_growth_past_the_limit_fails_inside_the_guest() {
    let project = Project::new(&manifest(
        "[function.hog]\ncomponent = \"{HOG}\"\nroute = \"/hog/...\"\nmemory_limit = \"32MiB\"\n",
    ));
    let lepton = project.up();
    let reply = lepton.get("/hog");
    assert_eq!(reply.status, 200, "{reply:?}");
    let mib: u32 = reply
        .body
        .strip_prefix("allocated ")
        .and_then(|rest| rest.strip_suffix(" MiB\n"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {reply:?}"));
    assert!(
        (16..32).contains(&mib),
        "allocated {mib} MiB under a 32 MiB limit"
    );
    // Allocating infallibly past the limit aborts the guest: a 500, and serving goes on.
    assert_eq!(lepton.get("/hog/abort").status, 500);
    assert_eq!(lepton.get("/hog").status, 200);
}

#[test]
fn request_bodies_over_the_limit_get_413() {
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\nmax_body_size = \"1KiB\"\n",
    ));
    let lepton = project.up();
    assert_eq!(
        lepton.post("/probe/echo", &[b'x'; 1024]).body,
        "ok: 1024 bytes\n"
    );
    assert_eq!(lepton.post("/probe/echo", &[b'x'; 1025]).status, 413);
    // Without a content-length (chunked), the cap is enforced while reading.
    let chunked = crate::util::reply(
        ureq::post(&lepton.url("/probe/echo")).send(std::io::Cursor::new(vec![b'y'; 4096])),
    );
    assert_eq!(chunked.status, 413, "{chunked:?}");
    assert_eq!(lepton.post("/probe/echo", b"small").body, "ok: 5 bytes\n");
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"2s\"\nmax_concurrency = 1\nmax_queue = 0\n",
    ));
    let lepton = project.up();
    let first = lepton.get_in_background("/spin");
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 1);
    let rejected = lepton.get("/spin");
    assert_eq!(rejected.status, 503);
    assert_eq!(rejected.header("retry-after"), Some("1"));
    assert_eq!(first.join().expect("thread").status, 504);
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"rejected\"}", "spin"),
        1
    );
}

#[test]
fn a_body_that_trickles_in_past_the_timeout_gets_408() {
    use std::io::{Read as _, Write as _};
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\ntimeout = \"1s\"\n",
    ));
    let lepton = project.up();
    let mut stream = std::net::TcpStream::connect(&lepton.address).expect("connect");
    // Announce 100 bytes, send 10, then nothing.
    stream
        .write_all(b"POST /probe/echo HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n0123456789")
        .expect("write");
    let started = Instant::now();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(lepton.post("/probe/echo", b"abc").body, "ok: 3 bytes\n");
}

#[test]
fn a_request_still_queued_at_its_deadline_gets_504() {
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"1s\"\nmax_concurrency = 1\nmax_queue = 4\n",
    ));
    let lepton = project.up();
    let first = lepton.get_in_background("/spin");
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 1);
    let queued = lepton.get("/spin");
    assert_eq!(queued.status, 504, "{queued:?}");
    assert_eq!(first.join().expect("thread").status, 504);
    assert_eq!(
        lepton.metric("lepton_request_failures_total{kind=\"rejected\"}", "spin"),
        0
    );
}

#[test]
fn a_node_out_of_instance_slots_answers_503_and_recovers() {
    // One instance slot for the whole node: while `spin` holds it, `hello` cannot
    // instantiate; that is back-pressure (503), not a server error.
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"1s\"\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up_with(&["--max-instances", "1"], &[]);
    let spinning = lepton.get_in_background("/spin");
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 1);
    let busy = lepton.get("/hello");
    assert_eq!(busy.status, 503, "{busy:?}");
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert_eq!(spinning.join().expect("thread").status, 504);
    assert_eq!(lepton.get("/hello").status, 200);
}

#[test]
fn connections_past_the_cap_wait_for_a_free_one() {
    use std::io::{Read as _, Write as _};
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up_with(&["--max-connections", "1"], &[]);
    // The first connection stays open (keep-alive) and holds the only slot.
    let mut first = std::net::TcpStream::connect(&lepton.address).expect("connect");
    first
        .write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .expect("write");
    let mut buffer = [0u8; 256];
    let n = first.read(&mut buffer).expect("read");
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
    // A second client is not served while the first holds the slot...
    let waiting = lepton.get_in_background("/hello");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiting.is_finished(),
        "a second connection was served past the cap"
    );
    // ...and is as soon as the first closes.
    drop(first);
    assert_eq!(waiting.join().expect("thread").status, 200);
}
