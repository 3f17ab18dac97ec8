//! Capabilities: nothing the manifest does not grant is reachable.

use crate::util::{Project, manifest, pong_server, write_file};

#[test]
fn environment_is_only_what_the_manifest_grants() {
    let project = Project::new(&manifest(
        "[function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\nenvironment = { GREETING = \"Bonjour\" }\n\
         [function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\nenvironment = { GRANTED = \"yes\" }\n",
    ));
    // The host's own environment must not leak into guests.
    let lepton = project.up_with(&[], &[("HOST_SECRET", "hunter2")]);
    assert_eq!(lepton.get("/hello").body, "Bonjour\n");
    assert_eq!(lepton.get("/probe/env?GRANTED").body, "ok: yes\n");
    let secret = lepton.get("/probe/env?HOST_SECRET");
    assert_eq!(secret.status, 403, "{secret:?}");
    assert_eq!(
        lepton.get("/probe/env?GREETING").status,
        403,
        "one function's grant is not another's"
    );
    assert_eq!(lepton.get("/probe/env?PATH").status, 403);
}

#[test]
fn files_are_read_only_and_limited_to_the_granted_directory() {
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\n\
         files = [{ source = \"static\", destination = \"/static\" }]\n\
         [function.bare]\ncomponent = \"{PROBE}\"\nroute = \"/bare/...\"\n",
    ));
    write_file(project.dir.path(), "static/greeting.txt", "from a file");
    write_file(project.dir.path(), "secret.txt", "not granted");
    let lepton = project.up();
    assert_eq!(
        lepton.get("/probe/file?/static/greeting.txt").body,
        "ok: from a file\n"
    );
    assert_eq!(lepton.get("/probe/write?/static/new.txt").status, 403);
    assert!(!project.path("static/new.txt").exists());
    assert_eq!(lepton.get("/probe/file?/static/../secret.txt").status, 403);
    assert_eq!(lepton.get("/probe/file?/etc/passwd").status, 403);
    assert_eq!(
        lepton.get("/bare/file?/static/greeting.txt").status,
        403,
        "no grant, no files"
    );
}

#[test]
fn outbound_http_reaches_only_allowed_hosts() {
    let allowed = pong_server();
    let other = pong_server();
    let project = Project::new(&manifest(&format!(
        "[function.probe]\ncomponent = \"{{PROBE}}\"\nroute = \"/probe/...\"\nallowed_outbound_hosts = [\"http://{allowed}\"]\n"
    )));
    let lepton = project.up();
    let ok = lepton.get(&format!("/probe/http?http://{allowed}/ping"));
    assert_eq!((ok.status, ok.body.as_str()), (200, "ok: 200 pong\n"));
    let denied = lepton.get(&format!("/probe/http?http://{other}/ping"));
    assert_eq!(denied.status, 403);
    assert!(denied.body.contains("HttpRequestDenied"), "{denied:?}");
    lepton.wait_for_log(&format!("denied outbound request to http://{other}/ping"));
}

#[test]
fn sockets_are_denied() {
    let target = pong_server();
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\n",
    ));
    let lepton = project.up();
    let reply = lepton.get(&format!("/probe/tcp?{target}"));
    assert_eq!(reply.status, 403, "{reply:?}");
    // Outbound HTTP with no grant at all is denied too.
    assert_eq!(
        lepton.get(&format!("/probe/http?http://{target}/")).status,
        403
    );
}

#[test]
fn a_line_written_in_pieces_is_one_record_and_empty_lines_are_kept() {
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\n",
    ));
    let lepton = project.up();
    let reply = lepton.get("/probe/pieces");
    assert_eq!(reply.status, 200);
    let request_id = reply
        .header("x-lepton-request-id")
        .expect("request id")
        .to_owned();
    // The unterminated tail is logged when the instance goes, after the answer.
    let log = lepton.wait_for_log("tail without newline");
    let records: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lepton::guest") && l.contains(&request_id))
        .collect();
    assert_eq!(records.len(), 3, "{records:#?}");
    assert!(
        records[0].contains("lepton::guest: piece one two three "),
        "{records:#?}"
    );
    assert!(records[1].contains("lepton::guest:  "), "{records:#?}");
    assert!(records[2].contains("tail without newline"), "{records:#?}");
}

#[test]
fn guest_output_goes_to_the_host_log_tagged_with_the_function() {
    let project = Project::new(&manifest(
        "[function.probe]\ncomponent = \"{PROBE}\"\nroute = \"/probe/...\"\n",
    ));
    let lepton = project.up();
    let reply = lepton.get("/probe/stdout");
    assert_eq!(reply.status, 200);
    let request_id = reply
        .header("x-lepton-request-id")
        .expect("request id")
        .to_owned();
    let log = lepton.wait_for_log("probe says hi on stdout");
    let line = log
        .lines()
        .find(|l| l.contains("probe says hi on stdout"))
        .expect("line");
    assert!(line.contains("function=probe"), "{line}");
    assert!(line.contains(&request_id), "{line}");
    assert!(
        line.contains("stream=\"stdout\"") || line.contains("stream=stdout"),
        "{line}"
    );
}
