//! `kv`: a key-value store and configuration over HTTP, through the standard
//! `wasi:keyvalue` and `wasi:config` interfaces (`lepton_sdk::kv`, `lepton_sdk::config`).
//!
//! The store is `?store=NAME` (default `default`); `KEY` is the rest of the path. The
//! first segment is the route's (`/kv` here), whatever it is.
//!
//! - `GET /kv/get/KEY`: the value (404 when unset);
//! - `PUT /kv/set/KEY`: sets it to the body;
//! - `DELETE /kv/delete/KEY`: removes it;
//! - `POST /kv/increment/KEY?by=N`: adds N (default 1) atomically, answers the new value;
//! - `GET /kv/keys`: every key, one per line;
//! - `GET /kv/config/KEY`: the manifest's `config` value (404 when unset);
//! - `GET /kv/config`: every config key (names only: values may be secrets).
//!
//! A store that is not granted answers 403, a limit 400.

use lepton_sdk::http::{Method, StatusCode};
use lepton_sdk::kv::{Error, Store};
use lepton_sdk::{Request, Response, text_response};

fn query<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then_some(value)
    })
}

fn failed(error: &Error) -> Response {
    let status = match error {
        Error::AccessDenied | Error::NoSuchStore => StatusCode::FORBIDDEN,
        Error::Other(_) => StatusCode::BAD_REQUEST,
    };
    text_response(status, format!("{error}\n"))
}

fn handle(request: Request) -> Response {
    // The first segment is the function's route (`/kv/...` in the examples).
    let path = request.uri().path().trim_start_matches('/');
    let path = path.split_once('/').map_or("", |(_, rest)| rest);
    let (action, key) = path.split_once('/').unwrap_or((path, ""));
    if action == "config" {
        return if key.is_empty() {
            match lepton_sdk::config::get_all() {
                Ok(all) => {
                    let mut keys: Vec<String> = all.into_iter().map(|(k, _)| k).collect();
                    keys.sort();
                    text_response(StatusCode::OK, keys.join("\n") + "\n")
                }
                Err(e) => text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        } else {
            match lepton_sdk::config::get(key) {
                Ok(Some(value)) => text_response(StatusCode::OK, value),
                Ok(None) => text_response(StatusCode::NOT_FOUND, "unset\n"),
                Err(e) => text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        };
    }
    let store = match Store::open(query(&request, "store").unwrap_or("default")) {
        Ok(store) => store,
        Err(e) => return failed(&e),
    };
    let result = match (request.method(), action) {
        (&Method::GET, "get") => store.get(key).map(|value| match value {
            Some(value) => {
                let mut response = Response::new(value);
                *response.status_mut() = StatusCode::OK;
                response
            }
            None => text_response(StatusCode::NOT_FOUND, "unset\n"),
        }),
        (&Method::PUT, "set") => store
            .set(key, request.body())
            .map(|()| text_response(StatusCode::OK, "set\n")),
        (&Method::DELETE, "delete") => store
            .delete(key)
            .map(|()| text_response(StatusCode::OK, "deleted\n")),
        (&Method::POST, "increment") => {
            let by = query(&request, "by").and_then(|n| n.parse().ok()).unwrap_or(1);
            store
                .increment(key, by)
                .map(|n| text_response(StatusCode::OK, format!("{n}\n")))
        }
        (&Method::GET, "keys") => store.keys().map(|mut keys| {
            keys.sort();
            text_response(StatusCode::OK, keys.join("\n") + "\n")
        }),
        _ => Ok(text_response(StatusCode::NOT_FOUND, "no such action\n")),
    };
    result.unwrap_or_else(|e| failed(&e))
}

lepton_sdk::http_handler!(handle);
