//! The guest bindings of the `lepton:function/guest` world (`wit/function.wit`):
//! the one `wit_bindgen::generate!` of this crate. Private; [`crate::nn`] and [`crate::train`] wrap it.

wit_bindgen::generate!({
    world: "lepton:function/guest",
    // Relative to this crate's `Cargo.toml`.
    path: "../wit",
    // The `wasi:nn` interfaces come from another package; generate them here
    // rather than map them onto a crate that provides them.
    generate_all,
});
