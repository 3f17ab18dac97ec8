//! The host's one `bindgen!`: the `lepton:function/imports` world (wasi:nn and
//! lepton:nn/training).
//!
//! `wasi:http` and the rest of WASI come bound by `wasmtime-wasi` and
//! `wasmtime-wasi-http`.

#![expect(
    missing_docs,
    reason = "bindgen-generated code; the re-exported types are documented in the WIT"
)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "lepton:function/imports",
    imports: {
        "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
        "wasi:nn/graph.load": async | trappable,
        "lepton:nn/training.open": trappable,
        "lepton:nn/training.[method]trainer.step": async | trappable,
        "lepton:nn/training.[method]trainer.evaluate": async | trappable,
        "lepton:nn/training.[method]trainer.export": async | trappable,
        "lepton:nn/training.[method]trainer.publish": async | trappable,
        "lepton:nn/training.[method]trainer.checkpoint": async | trappable,
        default: trappable,
    },
    with: {
        "wasi:nn/tensor.tensor": crate::nn::Tensor,
        "wasi:nn/graph.graph": crate::nn::Graph,
        "wasi:nn/inference.graph-execution-context": crate::nn::ExecutionContext,
        "wasi:nn/errors.error": crate::nn::NnError,
        "lepton:nn/training.trainer": crate::train::TrainerResource,
    },
    require_store_data_send: true,
});
